"""The search routes of ``metaeol serve --collection NAME``: the same auth, limits and JSON errors as the
embedding routes (:mod:`metaeol_edge.server` registers them on its app).

* ``POST /v1/search``: ``{"collection", "query", "k": 10}``, or ``{"collection", "to": {"path", "line"}}``
  for the neighbours of a stored chunk; answers ``{"object": "list", "collection", "model", "data":
  [{"rank", "score", "path", "line", "line_end", "chunk_id", "text"}]}``.
* ``GET /v1/collections``: ``{"object": "list", "data": [{"name", "chunks", "files", "model", "config"}]}``.
* ``GET /v1/collections/{name}/map?limit=10000``: a 2-D PCA projection, ``{"collection", "total",
  "sampled", "points": [{"chunk_id", "x", "y", "path", "line", "text"}]}`` (a seeded sample over ``limit``).
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
from typing import Any

from metaeol_edge.errors import InputError, MetaEOLError
from metaeol_edge.faces.search.collection import MAX_K, Collection

ROUTES = {"/v1/search", "/v1/collections"}


def register_search_routes(app: Any, collections: dict[str, Collection], limits: Any) -> set[str]:
    """Add the search routes over these open collections to a FastAPI app; the routes' paths (for metrics)."""
    from fastapi import Request

    from metaeol_edge.faces.api import ApiError, _kind, parse_json, read_body

    models = {name: c.stats()["model"] for name, c in collections.items()}

    def pick(name: object) -> tuple[str, Collection]:
        if name is None and len(collections) == 1:
            return next(iter(collections.items()))
        if not isinstance(name, str):
            raise ApiError(400, f"'collection' must be one of the served collections: {', '.join(collections)}",
                           param="collection")  # fmt: skip
        if name not in collections:
            raise ApiError(404, f"collection {name!r} is not served here; served: {', '.join(collections)}",
                           "not_found_error", param="collection", code="collection_not_found")  # fmt: skip
        return name, collections[name]

    async def call(fn, *args, not_found: bool = False):
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout=limits.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"the request took over {limits.timeout_s:g} s; retry later", "server_error",
                           code="timeout", headers={"Retry-After": "5"}) from None  # fmt: skip
        except InputError as exc:
            if not_found:
                raise ApiError(404, str(exc), "not_found_error", param="to", code="chunk_not_found") from exc
            raise ApiError(400, str(exc), param="query") from exc
        except (MetaEOLError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc

    def integer(value: object, key: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ApiError(400, f"'{key}' must be an integer from {lo} to {hi}, not {_kind(value)}"
                           + (f" {value}" if isinstance(value, int) and not isinstance(value, bool) else ""),
                           param=key)  # fmt: skip
        return value

    @app.post("/v1/search")
    async def search(request: Request):
        data = parse_json(await read_body(request, limits), limits)
        name, collection = pick(data.get("collection"))
        k = integer(data.get("k", 10), "k", 1, MAX_K)
        if ("query" in data) == ("to" in data):
            raise ApiError(400, "give 'query' (a string) or 'to' ({\"path\": ..., \"line\": ...}), one of the two",
                           param="query")  # fmt: skip
        if "query" in data:
            query = data["query"]
            if not isinstance(query, str):
                raise ApiError(400, f"'query' must be a string, not {_kind(query)}", param="query")
            if not query.strip():
                raise ApiError(400, "'query' is empty or whitespace only", param="query")
            if "\x00" in query:
                raise ApiError(400, "'query' contains a NUL character", param="query")
            if len(query) > limits.max_chars:
                raise ApiError(400, f"'query' has {len(query)} characters, over the limit of {limits.max_chars}",
                               param="query")  # fmt: skip
            hits = await call(collection.search, query, k)
        else:
            to = data["to"]
            if not isinstance(to, dict) or not isinstance(to.get("path"), str) or not to["path"]:
                raise ApiError(400, "'to' must be an object with a 'path' string and an optional 'line'", param="to")
            line = to.get("line")
            if line is not None:
                integer(line, "line", 1, 2**62)
            hits = await call(collection.similar, to["path"], line, k, not_found=True)
        return {"object": "list", "collection": name, "model": models[name], "data": [h.to_dict() for h in hits]}

    @app.get("/v1/collections")
    async def list_served():
        data = []
        for name, c in collections.items():
            stats = await asyncio.to_thread(c.stats)
            data.append({"name": name, "chunks": stats["chunks"], "files": stats["files"], "model": stats["model"],
                         "config": stats["config"]})  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/v1/collections/{name}/map")
    async def projection(name: str, request: Request):
        _, collection = pick(name)
        given = request.query_params.get("limit", "10000")
        if not given.isdigit() or len(given) > 7:
            raise ApiError(400, f"'limit' must be an integer from 1 to 100000, not {given!r}", param="limit")
        limit = integer(int(given), "limit", 1, 100_000)
        return await call(collection.map, limit)

    return set(ROUTES)
