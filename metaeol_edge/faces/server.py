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
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from metaeol_edge.core.embedder import EncodeStats, MetaEOL, Truncation
from metaeol_edge.core.postprocess import check_prefix, shorten
from metaeol_edge.errors import InputError, MetaEOLError
from metaeol_edge.faces import web
from metaeol_edge.faces.api import ApiError, Limits, _kind, _timeout, parse_inputs, parse_json, read_body  # noqa: F401 - 0.2 names
from metaeol_edge.models import resolve

# -- one worker per model --------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One request's sentences, embedded a slice at a time as its turns come."""

    sentences: list[str]
    truncate: bool
    client: str = "-"
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for it
    future: Future = field(default_factory=Future)
    taken: int = 0  # sentences handed to a batch so far
    done: int = 0  # sentences with their vectors
    vectors: np.ndarray | None = None
    tokens: int = 0
    stats: EncodeStats = field(default_factory=EncodeStats)

    @property
    def gone(self) -> bool:
        """Cancelled (its client left or timed out) or failed: its remaining work is dropped."""
        return self.future.done()


@dataclass
class Result:
    vectors: np.ndarray  # (n, dim) float32
    tokens: int  # the sentences' own tokens embedded (of a cut one, what was kept)
    stats: EncodeStats  # stats.truncated: the request's inputs that were cut, by their index

    def truncation(self) -> tuple[list[dict[str, int]], dict[str, str]]:
        """The response's ``truncated`` field (each cut input: index, tokens, kept) and its header."""
        cut = [{"index": t.index, "tokens": t.tokens, "kept": t.kept} for t in self.stats.truncated]
        header = {"X-Truncated-Inputs": ",".join(str(t["index"]) for t in cut)} if cut else {}
        return cut, header


def _settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Answer a future unless its waiter gave up on it first (cancelled: nobody reads it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


BATCH_SECONDS = 0.5  # an engine batch's length, at the measured rate: what a new request may wait behind
FIRST_BATCH = 8  # sentences in a model's first batch, before any rate is known


class ModelWorker:
    """Owns one model; embeds the waiting requests' sentences in engine batches, shared fairly.

    Each batch of up to ``batch_size`` sentences is filled round robin: one sentence from each
    waiting client in turn, and within a client from each of its requests in turn. A request of
    2,048 sentences therefore takes its share of every batch, and a one-sentence request sent
    behind it is answered after the batch running when it came. Work of a request whose client
    left, or whose deadline passed, is dropped before its next batch.
    """

    def __init__(self, name: str, model: MetaEOL, limits: Limits, normalize: bool = False) -> None:
        self.name, self.model, self.limits, self.normalize = name, model, limits, normalize
        # Computed once, here, at start-up: served on the event loop, they must neither wait for the
        # model's lock (held by a batch) nor hash a model file (--no-cache and a path: no memo).
        self.dim = model.dim
        self.fit_kinds = model.fit_kinds()  # what a request's 'dimensions' may cut (whitened vectors only)
        self.tags = {
            "name": name,
            "model": name,
            "size": model.model_path.stat().st_size,
            "digest": model.fingerprint,
            "details": {"format": "gguf", "family": model.info.architecture, "embedding_length": self.dim},
        }
        self.observe: Callable[[Result], None] = lambda result: None
        self._cond = threading.Condition()  # an RLock: a signal handler may take it on the event loop's thread
        self._clients: dict[str, deque[_Job]] = {}  # in turn order; each client's requests, in turn order
        self._accepting = True
        self._stopping = False
        self._rate: float | None = None  # sentences/s of this model's batches so far (a moving average)
        self._thread = threading.Thread(target=self._run, name=f"metaeol-{name}", daemon=True)
        self._thread.start()

    def submit(self, sentences: list[str], truncate: bool, client: str = "-", deadline: float | None = None) -> Future:
        if not self._accepting:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if deadline is None:
            deadline = time.monotonic() + self.limits.timeout_s
        job = _Job(sentences, truncate, client, deadline)
        with self._cond:
            if self._waiting() >= self.limits.max_queue:
                raise ApiError(
                    503, f"model {self.name} has {self.limits.max_queue} requests waiting; retry shortly",
                    "server_error", code="queue_full", headers={"Retry-After": "1"},
                )  # fmt: skip
            self._clients.setdefault(client, deque()).append(job)
            self._cond.notify()
        return job.future

    def depth(self) -> int:
        """Requests with sentences not yet handed to a batch."""
        with self._cond:
            return self._waiting()

    def _waiting(self) -> int:
        return sum(not job.gone for jobs in self._clients.values() for job in jobs)

    def begin_stop(self) -> None:
        """Take no new request; once the engine batch running now is done, answer every request
        with work left 503 ``shutting_down``. Safe in a signal handler (nothing here blocks)."""
        self._accepting = False
        self._stopping = True
        if self._cond.acquire(blocking=False):  # else the worker sees the flag within its 0.5 s wait
            try:
                self._cond.notify()
            finally:
                self._cond.release()

    def stop(self) -> None:
        """:meth:`begin_stop`, and wait for the thread: the batch running now, at most."""
        self.begin_stop()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._clients and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping:
                    error = ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
                    for jobs in self._clients.values():
                        for job in jobs:
                            _settle(job.future, error=error)
                    self._clients.clear()
                    return
                batch = self._take()
            if batch:
                self._embed(batch)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """The next batch (lock held): slices (job, start, stop), one sentence per turn, round robin."""
        now = time.monotonic()
        for client in list(self._clients):
            jobs = self._clients[client]
            for job in list(jobs):
                if not job.gone and now > job.deadline:
                    _settle(job.future, error=_timeout(self.limits))
                if job.gone:
                    jobs.remove(job)
            if not jobs:
                del self._clients[client]
        slices: dict[_Job, int] = {}  # job -> where its slice starts
        size, limit = 0, self._batch_limit()
        while self._clients and size < limit:
            for client in list(self._clients):
                jobs = self._clients.pop(client)
                job = jobs[0]
                slices.setdefault(job, job.taken)
                job.taken += 1
                size += 1
                if job.taken == len(job.sentences):
                    jobs.popleft()  # all handed out: its last slice is in this batch
                else:
                    jobs.rotate(-1)  # the client's next request has the next turn
                if jobs:
                    self._clients[client] = jobs  # to the end of the turn order
                if size == limit:
                    break
        return [(job, first, job.taken) for job, first in slices.items()]

    def _batch_limit(self) -> int:
        """Sentences in the next batch: about ``BATCH_SECONDS`` of work at the rate measured so far, at most
        ``--batch-size``. A request that arrives waits for the batch running, so a batch of a few seconds
        (64 PromptEOL sentences on 2 cores) would hold a one-sentence request that long; the engine's
        vectors do not depend on the batch, and its throughput barely does."""
        if self._rate is None:
            return min(self.limits.batch_size, FIRST_BATCH)
        return max(1, min(self.limits.batch_size, int(self._rate * BATCH_SECONDS)))

    def _embed(self, batch: list[tuple[_Job, int, int]]) -> None:
        for truncate in (True, False):
            group = [(job, a, b) for job, a, b in batch if job.truncate is truncate and not job.gone]
            if not group:
                continue
            try:
                first = group[0][1] if len(group) == 1 else 0  # one request's slice: errors name its sentence
                vectors, tokens, stats = self._encode(
                    [s for job, a, b in group for s in job.sentences[a:b]], truncate, start=first
                )
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][0].future, error=exc)
                    continue
                # One request's bad input must not fail the others batched with it.
                for job, a, b in group:
                    try:
                        vectors, tokens, stats = self._encode(job.sentences[a:b], truncate, start=a)
                    except Exception as one:
                        _settle(job.future, error=one)
                        continue
                    self._deliver(job, a, b, vectors, tokens, stats.truncated)
                continue
            at = first
            for job, a, b in group:
                n = b - a
                cut = [
                    Truncation(t.index - at + a, t.tokens, t.kept) for t in stats.truncated if at <= t.index < at + n
                ]
                self._deliver(job, a, b, vectors[at - first : at - first + n], tokens[at - first : at - first + n], cut)
                at += n

    def _deliver(
        self, job: _Job, a: int, b: int, vectors: np.ndarray, tokens: list[int], truncated: list[Truncation]
    ) -> None:
        """Sentences a..b-1 of a job are done; ``truncated`` indexes the job's own sentences."""
        if job.vectors is None:
            job.vectors = np.empty((len(job.sentences), vectors.shape[1]), dtype=np.float32)
        job.vectors[a:b] = vectors
        # The tokens embedded: a cut sentence counts what was kept of it.
        job.tokens += sum(tokens) - sum(tokens[t.index - a] - t.kept for t in truncated)
        job.stats.truncated.extend(truncated)
        job.done += b - a
        if job.done == len(job.sentences):
            job.stats.sentences = job.done
            job.stats.truncated.sort(key=lambda t: t.index)
            _settle(job.future, Result(job.vectors, job.tokens, job.stats))

    def _encode(
        self, sentences: list[str], truncate: bool, start: int = 0
    ) -> tuple[np.ndarray, list[int], EncodeStats]:
        """One engine batch. ``start``: the first sentence's index in its request (errors name it)."""
        stats = EncodeStats()
        t0 = time.perf_counter()
        parts = self.model.encode_batches(
            sentences,
            batch_size=len(sentences),
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
            stats=stats,
            truncate=truncate,
            start=start,
        )
        vectors = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        rate = len(sentences) / max(time.perf_counter() - t0, 1e-6)
        self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        tokens = self.model.token_counts(sentences)
        self.observe(Result(vectors, sum(tokens), stats))
        return vectors, tokens, stats


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
    collections: dict | None = None,
):
    """The FastAPI application over already loaded models, one worker each (and open search
    collections: :mod:`metaeol_edge.faces.search.http`)."""
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
    public = web.mount(app, routes)  # the page for people at / (faces/web): its files need no key, as /health

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
        # The handlers' own Request, behind this middleware, never sees a disconnect; this one does.
        request.scope["metaeol.is_disconnected"] = request.is_disconnected
        try:
            if api_key and path != "/health" and path not in public:
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

    def truncate_field(data: dict[str, object], worker: ModelWorker) -> bool:
        """A request's ``truncate``: true cuts an input over max_length (and says so in the response),
        false answers 400; absent, the server's setting (``metaeol serve --no-truncate``: false)."""
        truncate = data.get("truncate", worker.model.truncate)
        if not isinstance(truncate, bool):
            raise ApiError(400, "'truncate' must be true or false", param="truncate")
        return truncate

    def dimensions_field(data: dict[str, object], worker: ModelWorker) -> int | None:
        """A request's ``dimensions`` (OpenAI's, and Ollama's): the first K of whitened vectors, a shorter
        embedding of the same space; other vectors refuse, saying why (:func:`check_prefix`). Checked from what
        the worker knew at start-up: a request never waits for the model's lock to be told no."""
        dims = data.get("dimensions")
        if dims is None:
            return None
        try:
            return check_prefix(dims, worker.dim, worker.fit_kinds, "'dimensions'")
        except ValueError as exc:
            raise ApiError(400, f"{exc} ({worker.name})", param="dimensions") from exc

    async def run(worker: ModelWorker, sentences: list[str], truncate: bool, request: Request) -> Result:
        deadline = time.monotonic() + limits.timeout_s
        client = request.client.host if request.client else "-"
        future = worker.submit(sentences, truncate, client, deadline)
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout(limits)
                done, _ = await asyncio.wait({waiting}, timeout=min(0.25, left))
                if done:
                    return waiting.result()
                if await request.scope.get("metaeol.is_disconnected", request.is_disconnected)():
                    # Its remaining sentences are dropped, not computed.
                    raise ApiError(499, "the client closed the connection", code="client_closed")
        except InputError as exc:
            raise ApiError(400, str(exc), param="input") from exc
        except (MetaEOLError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc
        finally:
            future.cancel()  # a no-op once answered; else the worker drops what is left of it

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        data = parse_json(await read_body(request, limits), limits)
        worker = pick(data)
        sentences = parse_inputs(data, limits)
        fmt = data.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}", param="encoding_format")
        dims = dimensions_field(data, worker)
        if "user" in data and not isinstance(data["user"], str):
            raise ApiError(400, "'user' must be a string", param="user")
        result = await run(worker, sentences, truncate_field(data, worker), request)
        vectors = result.vectors if dims is None else shorten(result.vectors, dims, worker.normalize)
        encode = encode_base64 if fmt == "base64" else (lambda v: v.tolist())
        truncated, headers = result.truncation()
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "model": worker.name,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
            "truncated": truncated,
        }
        return JSONResponse(body, headers=headers)

    @app.get("/v1/models")
    async def openai_models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "metaeol-edge"} for name in workers],
        }

    @app.post("/api/embed")
    async def ollama_embed(request: Request):
        t0 = time.perf_counter_ns()
        data = parse_json(await read_body(request, limits), limits)
        worker = pick(data)
        sentences = parse_inputs(data, limits)
        truncate = truncate_field(data, worker)
        dims = dimensions_field(data, worker)
        # keep_alive and options are accepted as Ollama takes them; neither changes an embedding here.
        if not isinstance(data.get("options") or {}, dict):
            raise ApiError(400, "'options' must be an object", param="options")
        result = await run(worker, sentences, truncate, request)
        vectors = result.vectors if dims is None else shorten(result.vectors, dims, worker.normalize)
        truncated, headers = result.truncation()
        body = {
            "model": worker.name,
            "embeddings": vectors.tolist(),
            "total_duration": time.perf_counter_ns() - t0,
            "load_duration": 0,
            "prompt_eval_count": result.tokens,
            "truncated": truncated,
        }
        return JSONResponse(body, headers=headers)

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [worker.tags for worker in workers.values()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(workers)}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if collections:  # POST /v1/search, GET /v1/collections, GET /v1/collections/{name}/map
        from metaeol_edge.faces.search.http import register_search_routes

        routes.update(register_search_routes(app, collections, limits))
    return app


def served_name(spec: str) -> tuple[str, str]:
    """``NAME=MODEL`` or ``MODEL`` -> (name, model): a registry id serves as itself, a path by its file's stem."""
    name, sep, model = spec.partition("=")
    if sep and name and model and "/" not in name:
        return name, model
    from pathlib import Path

    return (Path(spec).stem if resolve.looks_like_path(spec) else spec), spec


def make_server(
    workers: dict[str, ModelWorker],
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits = Limits(),
    api_key: str | None = None,
    collections: dict | None = None,
):
    """(uvicorn server, listening socket, URL): bound now, so port 0 gives a free port to report."""
    import socket

    try:
        import uvicorn
    except ImportError as exc:
        raise MetaEOLError(
            "the server needs the [server] extra (uvicorn is missing): pip install 'metaeol-edge[server]'"
        ) from exc
    app = create_app(workers, limits, api_key, collections=collections)
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
        # Requests in flight are answered (vectors, or 503 shutting_down) once the workers' running
        # batches end; this bounds the wait for the rest.
        timeout_graceful_shutdown=SHUTDOWN_S,
        lifespan="off",
    )
    return _stopping_server_class()(config, workers), sock, url


SHUTDOWN_S = 10
"""Seconds a stopping server waits for its connections, after the batches running at the signal."""


def _stopping_server_class():
    import uvicorn

    class StoppingServer(uvicorn.Server):
        """uvicorn's server, whose first SIGTERM or Ctrl-C also stops the workers (they finish the
        engine batch running, and answer the work left 503), and whose second exits at once."""

        def __init__(self, config, workers: dict[str, ModelWorker]) -> None:
            super().__init__(config)
            self.workers = workers

        def handle_exit(self, sig: int, frame) -> None:
            # Not recorded in _captured_signals: uvicorn would raise it again once it has stopped.
            if self.should_exit:
                exit_now(sig)
            self.should_exit = True
            for worker in self.workers.values():
                worker.begin_stop()

    return StoppingServer


def exit_now(sig: int) -> None:
    """A second signal while stopping: exit at once (what is committed to the cache stays)."""
    import os

    os.write(2, b"second signal: exiting now\n")
    os._exit(128 + sig)


def serve(
    workers: dict[str, ModelWorker],
    host: str = "127.0.0.1",
    port: int = 8080,
    limits: Limits = Limits(),
    api_key: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    collections: dict | None = None,
) -> None:
    """Run the server until SIGTERM or Ctrl-C: then take no new request, finish the engine batch
    running, answer what is left 503 ``shutting_down``, and return within about SHUTDOWN_S seconds
    plus a batch (the caller closes the models, committing the cache). A second signal exits at once."""
    server, sock, url = make_server(workers, host, port, limits, api_key, collections)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready(url)

        server.startup = startup  # type: ignore[method-assign]
    import signal

    # While uvicorn runs, its handler (server.handle_exit) takes the signals; before and after
    # (the workers stopping), these do the same: the first stops, a second exits at once.
    def on_signal(signum: int, frame) -> None:
        server.handle_exit(signum, frame)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for worker in workers.values():
            worker.stop()  # the batch running, at most: the rest was answered 503
        for sig, handler in previous.items():
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
