"""``metaeol serve``: an HTTP face that OpenAI, Ollama and LangChain clients use unchanged.

Routes: ``POST /v1/embeddings`` (OpenAI), ``GET /v1/models``, ``POST /api/embed``
and ``GET /api/tags`` (Ollama), ``GET /health``, ``GET /metrics`` (Prometheus).

One worker thread owns each served model: requests queue, and the sentences of
every request waiting are embedded together in the engine's batches (the engine's
vectors do not depend on what is batched with them, so each is bit-identical to
``MetaEOL.encode``). A full queue answers 503 with ``Retry-After``. Every error
is a JSON body in OpenAI's shape, 4xx for what the client did wrong. Only served
model names are accepted, never a path. Needs the ``[server]`` extra.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations (Request) at runtime.

import asyncio
import base64
import hmac
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .embedder import EncodeStats, MetaEOL
from .errors import InputError, MetaEOLError, kind_of


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; every value has a flag of ``metaeol serve``."""

    max_body_bytes: int = 4_000_000
    max_inputs: int = 2048
    max_chars: int = 20_000
    timeout_s: float = 120.0
    max_queue: int = 256  # requests waiting per model
    batch_size: int = 64  # sentences per engine batch


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- one worker per model --------------------------------------------------------------------


@dataclass
class _Job:
    sentences: list[str]
    truncate: bool
    future: Future = field(default_factory=Future)


@dataclass
class Result:
    vectors: np.ndarray  # (n, dim) float32
    tokens: int  # the sentences' own tokens
    stats: EncodeStats


class ModelWorker:
    """Owns one model; embeds the sentences of every waiting request together, in order."""

    def __init__(self, name: str, model: MetaEOL, limits: Limits, normalize: bool = False) -> None:
        self.name, self.model, self.limits, self.normalize = name, model, limits, normalize
        # Computed once, here, at start-up: served on the event loop, they must neither wait for the
        # model's lock (held by a batch) nor hash a model file (--no-cache and a path: no memo).
        self.dim = model.dim
        self.tags = {
            "name": name,
            "model": name,
            "size": model.model_path.stat().st_size,
            "digest": model.fingerprint,
            "details": {"format": "gguf", "family": model.info.architecture, "embedding_length": self.dim},
        }
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.observe: Callable[[Result], None] = lambda result: None
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"metaeol-{name}", daemon=True)
        self._thread.start()

    def submit(self, sentences: list[str], truncate: bool) -> Future:
        if not self._accepting:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        job = _Job(sentences, truncate)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503, f"model {self.name} has {self.limits.max_queue} requests waiting; retry shortly",
                "server_error", code="queue_full", headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        return job.future

    def depth(self) -> int:
        return self.queue.qsize()

    def stop(self) -> None:
        """Take no new request, finish those queued, and stop the thread."""
        self._accepting = False
        self.queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            size = len(first.sentences)
            # Whatever else is waiting joins this batch, up to the batch size.
            while size < self.limits.batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                size += len(nxt.sentences)
            for truncate in (True, False):
                group = [j for j in jobs if j.truncate is truncate and j.future.set_running_or_notify_cancel()]
                if group:
                    self._embed(group, truncate)
            if stop:
                return

    def _embed(self, jobs: list[_Job], truncate: bool) -> None:
        try:
            vectors, tokens, stats = self._encode([s for j in jobs for s in j.sentences], truncate)
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            # One request's bad input must not fail the others batched with it.
            for job in jobs:
                try:
                    vectors, tokens, stats = self._encode(job.sentences, truncate)
                    job.future.set_result(Result(vectors, sum(tokens), stats))
                except Exception as one:
                    job.future.set_exception(one)
            return
        start = 0
        for job in jobs:
            n = len(job.sentences)
            job.future.set_result(Result(vectors[start : start + n], sum(tokens[start : start + n]), stats))
            start += n

    def _encode(self, sentences: list[str], truncate: bool) -> tuple[np.ndarray, list[int], EncodeStats]:
        stats = EncodeStats()
        vectors = self.model.encode(
            sentences,
            batch_size=self.limits.batch_size,
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
            stats=stats,
            truncate=truncate,
        )
        tokens = self.model.token_counts(sentences)
        vectors = np.asarray(vectors, dtype=np.float32)
        self.observe(Result(vectors, sum(tokens), stats))
        return vectors, tokens, stats


# -- request parsing: every check gives a 4xx that says what is wrong ------------------------------


def parse_json(body: bytes, limits: Limits) -> dict[str, object]:
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ApiError(
            400, f"request body holds an integer of over {sys.get_int_max_str_digits()} digits: send a smaller number"
        ) from exc
    except RecursionError as exc:  # [[[[... deeper than the parser's stack
        raise ApiError(400, "request body nests arrays or objects too deeply to read") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def parse_inputs(data: dict[str, object], limits: Limits, key: str = "input") -> list[str]:
    """The ``input`` field as a list of non-empty strings, or a 400 naming what is wrong."""
    if key not in data:
        raise ApiError(400, f"'{key}' is required: a string or an array of strings", param=key)
    value = data[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ApiError(400, f"'{key}' must be a string or an array of strings, not {_kind(value)}", param=key)
    if not items:
        raise ApiError(400, f"'{key}' is an empty array: give at least one string", param=key)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items) or all(isinstance(x, list) for x in items):
        raise ApiError(
            400,
            f"'{key}' holds token ids: this server embeds text (its model has its own tokenizer); send strings. "
            "LangChain's OpenAIEmbeddings sends token ids unless given check_embedding_ctx_length=False",
            param=key,
            code="token_ids_not_supported",
        )
    if len(items) > limits.max_inputs:
        raise ApiError(400, f"'{key}' has {len(items)} items, over the limit of {limits.max_inputs}", param=key)
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if not isinstance(value, str) else key
        if not isinstance(item, str):
            raise ApiError(400, f"{where} must be a string, not {_kind(item)}", param=key)
        if not item.strip():
            raise ApiError(400, f"{where} is empty or whitespace only", param=key)
        if "\x00" in item:
            raise ApiError(400, f"{where} contains a NUL character", param=key)
        if len(item) > limits.max_chars:
            raise ApiError(400, f"{where} has {len(item)} characters, over the limit of {limits.max_chars}", param=key)
    return items  # type: ignore[return-value]


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value)) or kind_of(value)  # JSON's names; "an integer", "a number" for the rest


def check_api_key(key: str, where: str = "the API key") -> str:
    """The key, or an :class:`InputError` for one that can never work as meant: empty (which turned
    authentication off, silently), or one no client can send and match (not printable ASCII: an HTTP
    header carries it; spaces at either end: the token read from the header is stripped)."""
    if not key.strip():
        raise InputError(f"{where} is empty, which would leave the server open: give a key, or none at all")
    if not (key.isascii() and key.isprintable()):
        bad = next(i for i, ch in enumerate(key) if not (ch.isascii() and ch.isprintable()))
        raise InputError(
            f"{where} has a character that is not printable ASCII (at position {bad + 1}): "
            "an Authorization header cannot carry it, so no client could match it"
        )
    if key != key.strip():
        raise InputError(f"{where} begins or ends with a space, which no client's Authorization header keeps")
    return key


def loggable(text: str) -> str:
    """``text`` for one log line: unprintable characters (``\\n``, ``\\x1b``, ``\\u2028``), backslashes
    and quotes escaped, so a client cannot end the line or forge the next one."""

    def one(ch: str) -> str:
        if ch == '"':
            return '\\"'
        if ch == "\\" or not ch.isprintable():
            return ch.encode("unicode_escape").decode("ascii")
        return ch

    return "".join(map(one, text))


def encode_base64(vector: np.ndarray) -> str:
    """float32 little-endian, base64: what OpenAI sends for ``encoding_format: base64``."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


# -- the application ---------------------------------------------------------------------------


def create_app(
    workers: dict[str, ModelWorker],
    limits: Limits = Limits(),
    api_key: str | None = None,
    log: Callable[[str], None] | None = None,
):
    """The FastAPI application over already loaded models, one worker each."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
        from starlette.exceptions import HTTPException
    except ImportError as exc:
        raise MetaEOLError(
            f"the server needs the [server] extra ({exc.name} is missing): pip install 'metaeol-edge[server]'"
        ) from exc

    if api_key is not None:
        check_api_key(api_key)  # an empty key must not turn authentication off
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    registry = CollectorRegistry()
    requests_total = Counter("metaeol_requests", "HTTP requests", ["route", "status"], registry=registry)
    sentences_total = Counter("metaeol_sentences", "Sentences embedded", ["model"], registry=registry)
    hits_total = Counter("metaeol_cache_hits", "Prompt vectors read from the cache", ["model"], registry=registry)
    misses_total = Counter("metaeol_cache_misses", "Prompt vectors computed", ["model"], registry=registry)
    depth = Gauge("metaeol_queue_depth", "Requests waiting", ["model"], registry=registry)
    latency = Histogram("metaeol_request_seconds", "Request latency", ["route"], registry=registry)
    for name, worker in workers.items():
        depth.labels(name).set_function(worker.depth)

        def observe(result: Result, name: str = name) -> None:
            sentences_total.labels(name).inc(len(result.vectors))
            hits_total.labels(name).inc(result.stats.hits)
            misses_total.labels(name).inc(result.stats.misses)

        worker.observe = observe

    app = FastAPI(title="metaeol-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workers = workers
    routes = {"/v1/embeddings", "/v1/models", "/api/embed", "/api/tags", "/health", "/metrics"}

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        route = path if path in routes else "other"
        # The path as routed (percent-decoded: %0A is a newline, %1B an escape), escaped so that it
        # cannot end the log line or forge another; request.url drops some of these, the scope does not.
        shown = loggable(request.scope.get("path", path))
        try:
            if api_key and path != "/health":
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                    raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                   "authentication_error", code="invalid_api_key")  # fmt: skip
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limits.max_body_bytes:
                raise ApiError(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}")
            response = await call_next(request)
        except ApiError as err:
            response = error_response(err)
        except Exception as exc:  # never a bare 500 page: a JSON error, logged
            log(f"error: {request.method} {shown}: {type(exc).__name__}: {loggable(str(exc))}")
            response = error_response(ApiError(500, "internal error", "server_error"))
        seconds = time.perf_counter() - t0
        requests_total.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(seconds)
        client = request.client.host if request.client else "-"
        log(f'{client} "{request.method} {shown}" {response.status_code} {seconds * 1000:.1f}ms')
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), type_)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(ApiError(400, f"invalid request: {exc.errors()}"))

    def pick(data: dict[str, object]) -> ModelWorker:
        name = data.get("model")
        if name is None and len(workers) == 1:
            return next(iter(workers.values()))
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be one of the served models: {', '.join(workers)}", param="model")
        if name in workers:
            return workers[name]
        if name.endswith(":latest") and name[: -len(":latest")] in workers:  # what Ollama clients add
            return workers[name[: -len(":latest")]]
        if "/" in name or "\\" in name or name.endswith(".gguf"):
            raise ApiError(400, f"model {name!r} looks like a path: a request can only name a served model "
                           f"({', '.join(workers)})", param="model", code="model_not_found")  # fmt: skip
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(workers)}",
                       "not_found_error", param="model", code="model_not_found")  # fmt: skip

    async def run(worker: ModelWorker, sentences: list[str], truncate: bool) -> Result:
        future = worker.submit(sentences, truncate)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise ApiError(503, f"the request took over {limits.timeout_s:g} s; retry later", "server_error",
                           code="timeout", headers={"Retry-After": "5"}) from None  # fmt: skip
        except InputError as exc:
            raise ApiError(400, str(exc), param="input") from exc
        except (MetaEOLError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        data = parse_json(await request.body(), limits)
        worker = pick(data)
        sentences = parse_inputs(data, limits)
        fmt = data.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}", param="encoding_format")
        dims = data.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or dims != worker.dim):
            raise ApiError(400, f"'dimensions' can only be {worker.dim} for {worker.name}, its width: "
                           "this model's vectors cannot be shortened", param="dimensions")  # fmt: skip
        if "user" in data and not isinstance(data["user"], str):
            raise ApiError(400, "'user' must be a string", param="user")
        result = await run(worker, sentences, truncate=True)
        encode = encode_base64 if fmt == "base64" else (lambda v: v.tolist())
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
            "model": worker.name,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }

    @app.get("/v1/models")
    async def openai_models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "metaeol-edge"} for name in workers],
        }

    @app.post("/api/embed")
    async def ollama_embed(request: Request):
        t0 = time.perf_counter_ns()
        data = parse_json(await request.body(), limits)
        worker = pick(data)
        sentences = parse_inputs(data, limits)
        truncate = data.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ApiError(400, "'truncate' must be true or false", param="truncate")
        # keep_alive and options are accepted as Ollama takes them; neither changes an embedding here.
        if not isinstance(data.get("options") or {}, dict):
            raise ApiError(400, "'options' must be an object", param="options")
        result = await run(worker, sentences, truncate=truncate)
        return {
            "model": worker.name,
            "embeddings": result.vectors.tolist(),
            "total_duration": time.perf_counter_ns() - t0,
            "load_duration": 0,
            "prompt_eval_count": result.tokens,
        }

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [worker.tags for worker in workers.values()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(workers)}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def served_name(spec: str) -> tuple[str, str]:
    """``NAME=MODEL`` or ``MODEL`` -> (name, model): a registry id serves as itself, a path by its file's stem."""
    name, sep, model = spec.partition("=")
    if sep and name and model and "/" not in name:
        return name, model
    from pathlib import Path

    from . import registry

    return (Path(spec).stem if registry.looks_like_path(spec) else spec), spec


def make_server(
    workers: dict[str, ModelWorker],
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits = Limits(),
    api_key: str | None = None,
):
    """(uvicorn server, listening socket, URL): bound now, so port 0 gives a free port to report."""
    import socket

    try:
        import uvicorn
    except ImportError as exc:
        raise MetaEOLError(
            "the server needs the [server] extra (uvicorn is missing): pip install 'metaeol-edge[server]'"
        ) from exc
    app = create_app(workers, limits, api_key)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise MetaEOLError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MetaEOLError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # one line per request comes from the app itself
        timeout_graceful_shutdown=int(limits.timeout_s) + 5,
        lifespan="off",
    )
    return uvicorn.Server(config), sock, url


def serve(
    workers: dict[str, ModelWorker],
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits = Limits(),
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the server until SIGTERM or Ctrl-C: then take no new request, finish those in flight,
    let every worker finish its queue, and return (the caller closes the models, committing the cache)."""
    server, sock, url = make_server(workers, host, port, limits, api_key)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready(url)

        server.startup = startup  # type: ignore[method-assign]
    import signal

    # uvicorn re-raises the signal that stopped it once it is done; with the
    # default handlers that would kill the process before the workers finish
    # and the caller commits the cache. These handlers take it quietly.
    quiet: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            quiet[sig] = signal.signal(sig, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for worker in workers.values():
            worker.stop()
        for sig, handler in quiet.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    if host == "localhost":
        return True
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False
