"""Serving the page: its files at fixed paths with the security headers, and ``GET /v1/status``.

The page's files hold no data, so any visitor may fetch them without the API key, as ``/health``;
everything the page shows comes from the API with the key (``/v1/embeddings``, ``/v1/models``,
``/v1/status``, ``/metrics``, the search routes), exactly as any other client calls it.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime.

import hashlib
import time
from importlib import resources

from metaeol_edge import __version__

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
"""Only this server's own files: no inline script or style, no ``eval``, no remote origin, no framing."""

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors' older spelling
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: an upgrade's page is never stale
}

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/icon.svg": ("icon.svg", "image/svg+xml"),
}
"""URL path -> (file in ``static/``, media type): the page's every file, and nothing else is served from there."""


def status(workers: dict, started: float) -> dict[str, object]:
    """What ``GET /v1/status`` answers: the version, and each served model's configuration and queue.

    The queue depth is the function ``metaeol_queue_depth`` reads; the counters (sentences, cache hits
    and misses, requests) are ``/metrics``' own, which the page reads there."""
    models = []
    for name, worker in workers.items():
        model = worker.model
        preset = getattr(model, "preset", None)
        info = getattr(model, "info", None)
        models.append(
            {
                "id": name,
                "file": model.model_path.name,  # the name only: a request never learns the server's paths
                "architecture": getattr(info, "architecture", None),
                "n_layer": getattr(info, "n_layer", None),
                "dim": model.dim,
                "layer": model.read,  # a list where layers are averaged
                "templates": model.templates.name,
                "n_templates": len(model.templates),
                "method": model.method.name,
                "preset": preset.label if preset is not None else None,
                "postprocess": bool(getattr(model, "postprocess", False)),
                "level": getattr(model, "level", None),
                "max_length": model.max_length,
                "normalize": worker.normalize,
                "queue_depth": worker.depth(),
                "max_queue": worker.limits.max_queue,
            }
        )
    return {"object": "status", "version": __version__, "uptime_s": round(time.time() - started, 3), "models": models}


def _files() -> dict[str, tuple[bytes, str, str]]:
    folder = resources.files(__package__).joinpath("static")
    out = {}
    for path, (name, media_type) in FILES.items():
        body = folder.joinpath(name).read_bytes()
        out[path] = (body, media_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return out


def mount(app, routes: set[str] | None = None) -> frozenset[str]:
    """Add the page's files and ``GET /v1/status`` to ``app``; add their paths to ``routes`` (the
    metrics' route labels) and return the page's paths: the files any visitor may fetch without the key."""
    from fastapi import Request
    from fastapi.responses import Response

    started = time.time()
    files = _files()

    def serve(path: str):
        body, media_type, etag = files[path]

        async def page_file(request: Request):
            headers = PAGE_HEADERS | {"ETag": etag}
            if etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
            return Response(body, media_type=media_type, headers=headers)

        return page_file

    for path in files:
        app.add_api_route(path, serve(path), methods=["GET"], include_in_schema=False)

    @app.get("/v1/status")
    async def v1_status():
        return status(app.state.workers, started)

    if routes is not None:
        routes.update(files, {"/v1/status"})
    return frozenset(files)
