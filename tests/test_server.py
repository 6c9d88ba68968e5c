"""`metaeol serve`: real clients against a real uvicorn server on 127.0.0.1, every vector bit-identical
to ``MetaEOL.encode``; bad requests get a 4xx JSON error; a full queue a 503; SIGTERM loses nothing.

The server's logic is the subject here, not the engine's numbers: the tests serve the fake backend
(conftest ``fake_model``), and one end-to-end test serves the real smollm2-135m."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import FAKE, counted, fake

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from metaeol_edge.server import ApiError, Limits, ModelWorker, make_server  # noqa: E402

from metaeol_edge import MetaEOL  # noqa: E402

SENTENCES = ["A cat sleeps on the mat.", "A kitten is napping.", "The stock market fell sharply today.", "Hi"]
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def expected(fake_model):
    with fake(fake_model, "prompteol", cache=False) as m:
        return {s: v for s, v in zip(SENTENCES, m.encode(SENTENCES), strict=True)}


class _Running:
    def __init__(self, workers, limits=None, api_key=None):
        self.workers = workers
        self.server, sock, self.url = make_server(workers, "127.0.0.1", 0, limits or Limits(), api_key)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=60)
        for w in self.workers.values():
            w.stop()
            w.model.close()


@pytest.fixture(scope="module")
def served(fake_model, tmp_path_factory):
    model = fake(fake_model, "prompteol", cache=tmp_path_factory.mktemp("serve") / "c.sqlite3")
    limits = Limits(max_inputs=16, max_chars=2000)
    running = _Running({"smollm2-135m": ModelWorker("smollm2-135m", model, limits)}, limits)
    yield running
    running.stop()


def _vectors(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def _same(got, expected, sentences):
    want = np.stack([expected[s] for s in sentences])
    assert _vectors(got).tobytes() == want.tobytes()


def test_raw_http_openai_and_ollama_shapes(served, expected):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": SENTENCES, "user": "me"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "smollm2-135m"
        assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and body["data"][0]["object"] == "embedding"
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        _same([d["embedding"] for d in body["data"]], expected, SENTENCES)
        r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": SENTENCES[0], "encoding_format": "base64"})
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        assert np.frombuffer(raw, dtype="<f4").tobytes() == expected[SENTENCES[0]].tobytes()
        r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": "Hi", "dimensions": 576})
        assert r.status_code == 200
        r = c.post("/api/embed", json={"model": "smollm2-135m", "input": SENTENCES, "keep_alive": "5m", "options": {}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "smollm2-135m" and body["prompt_eval_count"] > 0 and body["total_duration"] > 0
        _same(body["embeddings"], expected, SENTENCES)
        assert c.get("/api/tags").json()["models"][0]["details"]["embedding_length"] == 576
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m"]
        assert c.get("/health").json()["status"] == "ok"
        metrics = c.get("/metrics").text
        names = ["metaeol_requests_total", "metaeol_sentences_total", "metaeol_cache_hits_total"]
        names += ["metaeol_cache_misses_total", "metaeol_queue_depth", "metaeol_request_seconds_bucket"]
        assert all(name in metrics for name in names), metrics


def test_the_openai_client_float_and_base64(served, expected):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    got = client.embeddings.create(model="smollm2-135m", input=SENTENCES)  # base64 on the wire, by default
    _same([d.embedding for d in got.data], expected, SENTENCES)
    got = client.embeddings.create(model="smollm2-135m", input=SENTENCES, encoding_format="float")
    _same([d.embedding for d in got.data], expected, SENTENCES)


def test_langchain_openai_and_ollama_clients(served, expected):
    lc_openai = pytest.importorskip("langchain_openai")
    lc_ollama = pytest.importorskip("langchain_ollama")
    emb = lc_openai.OpenAIEmbeddings(
        model="smollm2-135m", base_url=f"{served.url}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    _same(emb.embed_documents(SENTENCES), expected, SENTENCES)
    _same([emb.embed_query(SENTENCES[1])], expected, SENTENCES[1:2])
    ollama = lc_ollama.OllamaEmbeddings(model="smollm2-135m", base_url=served.url)
    _same(ollama.embed_documents(SENTENCES), expected, SENTENCES)
    _same([ollama.embed_query(SENTENCES[2])], expected, SENTENCES[2:3])


def test_concurrent_requests_are_batched_together_and_stay_exact(served, expected):
    def one(k: int):
        sentences = [SENTENCES[(k + j) % 4] for j in range(1 + k % 4)]
        with httpx.Client(base_url=served.url, timeout=120) as c:
            r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": sentences})
        return sentences, r

    with ThreadPoolExecutor(8) as pool:
        for sentences, r in pool.map(one, range(24)):
            assert r.status_code == 200, r.text
            _same([d["embedding"] for d in r.json()["data"]], expected, sentences)


def _bad_cases(url):
    long = "7 " * 900  # ~900 tokens in 1,800 characters: under the character limit, over max_length
    return [
        ("malformed JSON", "POST", "/v1/embeddings", b"{not json", 400, "not valid JSON"),
        ("not UTF-8", "POST", "/v1/embeddings", b'{"input": "\xff\xfe"}', 400, "not UTF-8"),
        ("body not an object", "POST", "/v1/embeddings", b'["a"]', 400, "must be a JSON object"),
        ("input missing", "POST", "/v1/embeddings", {"model": "smollm2-135m"}, 400, "'input' is required"),
        ("input a number", "POST", "/v1/embeddings", {"input": 5}, 400, "not an integer"),
        ("input an object", "POST", "/v1/embeddings", {"input": {"a": 1}}, 400, "not an object"),
        ("input empty list", "POST", "/v1/embeddings", {"input": []}, 400, "empty array"),
        ("input empty string", "POST", "/v1/embeddings", {"input": ""}, 400, "empty or whitespace"),
        ("input blank string", "POST", "/v1/embeddings", {"input": ["ok", "   "]}, 400, "input[1] is empty"),
        ("input mixed types", "POST", "/v1/embeddings", {"input": ["ok", 3]}, 400, "input[1] must be a string"),
        ("input null item", "POST", "/v1/embeddings", {"input": ["ok", None]}, 400, "not null"),
        ("NUL in input", "POST", "/v1/embeddings", {"input": "a\u0000b"}, 400, "NUL"),
        ("too many inputs", "POST", "/v1/embeddings", {"input": ["a"] * 17}, 400, "over the limit of 16"),
        ("too long an input", "POST", "/v1/embeddings", {"input": "x" * 2001}, 400, "over the limit of 2000"),
        ("token ids", "POST", "/v1/embeddings", {"input": [1, 2, 3]}, 400, "token ids"),
        ("token id arrays", "POST", "/v1/embeddings", {"input": [[1, 2], [3]]}, 400, "token ids"),
        ("unknown model", "POST", "/v1/embeddings", {"model": "gpt-4", "input": "a"}, 404, "not served here"),
        ("model a path", "POST", "/v1/embeddings", {"model": "/etc/passwd", "input": "a"}, 400, "looks like a path"),
        ("model a .gguf", "POST", "/v1/embeddings", {"model": "x.gguf", "input": "a"}, 400, "looks like a path"),
        ("model not a string", "POST", "/v1/embeddings", {"model": 3, "input": "a"}, 400, "'model' must be"),
        ("bad encoding_format", "POST", "/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 400, "base64"),
        ("wrong dimensions", "POST", "/v1/embeddings", {"input": "a", "dimensions": 256}, 400, "'dimensions'"),
        ("user not a string", "POST", "/v1/embeddings", {"input": "a", "user": 5}, 400, "'user' must be a string"),
        ("oversized body", "POST", "/v1/embeddings", b"{" + b" " * 4_100_000 + b"}", 413, "over the limit"),
        # No Content-Length: Transfer-Encoding chunked, 4,000,001 bytes in 64 KB chunks.
        ("oversized chunked body", "POST", "/v1/embeddings", [b" " * 65536] * 61 + [b" " * 2305], 413, "over the"),
        (
            "ollama truncate off",
            "POST",
            "/api/embed",
            {"model": "smollm2-135m", "input": long, "truncate": False},
            400,
            "over max_length",
        ),  # fmt: skip
        ("ollama truncate not bool", "POST", "/api/embed", {"input": "a", "truncate": "no"}, 400, "'truncate'"),
        ("ollama options not object", "POST", "/api/embed", {"input": "a", "options": 3}, 400, "'options'"),
        ("ollama no input", "POST", "/api/embed", {"model": "smollm2-135m"}, 400, "'input' is required"),
        ("wrong method", "GET", "/v1/embeddings", None, 405, "GET is not allowed"),
        ("wrong method on health", "DELETE", "/health", None, 405, "not allowed"),
        ("unknown route", "GET", "/v2/nothing", None, 404, "no route"),
    ]


def test_every_bad_request_gets_its_4xx_and_the_server_stays_up(served, expected):
    good = {"model": "smollm2-135m", "input": SENTENCES[:1]}
    with httpx.Client(base_url=served.url, timeout=60) as c:
        cases = _bad_cases(served.url)
        assert len(cases) >= 25
        for name, method, path, body, status, message in cases:
            kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
            if isinstance(body, list) and body and isinstance(body[0], bytes):
                kwargs = {"content": iter(body)}  # a generator: httpx sends it chunked
            r = c.request(method, path, **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert message in err["message"] and set(err) == {"message", "type", "param", "code"}, (name, err)
            ok = c.post("/v1/embeddings", json=good)  # and a good request right after
            assert ok.status_code == 200, name
            _same([ok.json()["data"][0]["embedding"]], expected, SENTENCES[:1])


def test_an_api_key_guards_every_route_but_health(fake_model, expected):
    running = _Running({"m": ModelWorker("m", fake(fake_model, "prompteol", cache=False), Limits())}, api_key=KEY)
    app = running.server.config.app
    # Every route the application has (those added later too), each with each of its methods, but the
    # page's files (they hold no data: a browser cannot send the key when it loads a page).
    from metaeol_edge.faces.web.page import _files

    public = set(_files())
    assert public and "/" in public
    routes = [
        (m, r.path)
        for r in app.routes
        if hasattr(r, "methods") and r.path != "/health" and r.path not in public
        for m in r.methods
    ]
    assert {p for _, p in routes} >= {"/v1/embeddings", "/v1/models", "/api/embed", "/api/tags", "/metrics"}
    odd = [("HEAD", "/v1/models"), ("OPTIONS", "/v1/embeddings"), ("GET", "/v1/models/"), ("GET", "//v1/models")]
    odd += [("GET", "/health/"), ("POST", "/v1/embeddings/"), ("GET", "/nothing"), ("OPTIONS", "/api/tags")]
    body = {"model": "m", "input": "Hi"}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
                for method, path in routes + odd:
                    url = running.url + path  # a whole URL: httpx would merge "//v1/models" into "/v1/models"
                    r = c.request(method, url, json=body if method == "POST" else None, headers=headers)
                    assert r.request.url.raw_path == path.encode()
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    if method != "HEAD":
                        assert r.json()["error"]["type"] == "authentication_error"
            for path in public:
                assert c.get(path).status_code == 200, path
            good = {"Authorization": f"Bearer {KEY}"}
            for method, path in routes:
                r = c.request(method, path, json=body if method == "POST" else None, headers=good)
                assert r.status_code == 200, (method, path, r.text)
            r = c.post("/v1/embeddings", json=body, headers=good)
            _same([r.json()["data"][0]["embedding"]], expected, ["Hi"])
    finally:
        running.stop()


def test_a_full_queue_answers_503_with_retry_after_never_a_hang(fake_model):
    model = fake(fake_model, "prompteol", cache=False)
    release = threading.Event()
    real = model.encode_batches
    model.encode_batches = lambda *a, **k: (release.wait(60), real(*a, **k))[1]  # the engine is busy
    worker = ModelWorker("m", model, Limits(max_queue=1))
    try:
        first = worker.submit(["A cat."], True)  # taken by the worker, blocked in encode
        deadline = time.time() + 10
        while worker.depth() and time.time() < deadline:
            time.sleep(0.01)
        assert worker.depth() == 0, "the worker never took the first request"
        second = worker.submit(["A dog."], True)  # waits in the queue
        with pytest.raises(ApiError) as full:
            worker.submit(["A bird."], True)
        assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
        release.set()
        assert first.result(60).vectors.shape == second.result(60).vectors.shape == (1, 576)
    finally:
        release.set()
        worker.stop()
        model.close()


def test_one_bad_request_in_a_batch_does_not_fail_the_others(fake_model, expected):
    model = fake(fake_model, "prompteol", cache=False)
    release = threading.Event()
    real = model.encode_batches
    model.encode_batches = lambda *a, **k: (release.wait(60), real(*a, **k))[1]
    worker = ModelWorker("m", model, Limits())
    try:
        first = worker.submit(["Hi"], True)  # holds the worker while the others queue up
        deadline = time.time() + 10
        while worker.depth() and time.time() < deadline:
            time.sleep(0.01)
        assert worker.depth() == 0, "the worker never took the first request"
        jobs = [(["word " * 600], False), ([SENTENCES[0]], True), ([SENTENCES[1]], False)]
        futures = [first, *(worker.submit(s, t) for s, t in jobs)]
        release.set()  # the three queued ones are then one batch (two groups by truncation)
        assert futures[0].result(60).vectors.tobytes() == expected["Hi"].tobytes()
        with pytest.raises(Exception, match="over max_length"):
            futures[1].result(60)
        assert futures[2].result(60).vectors[0].tobytes() == expected[SENTENCES[0]].tobytes()
        assert futures[3].result(60).vectors[0].tobytes() == expected[SENTENCES[1]].tobytes()
    finally:
        worker.stop()
        model.close()


def _serve_process(fake_model, cache, *args, delay: float = 0.0):
    """``metaeol serve`` on the fake backend in a subprocess: (process, URL, its stderr lines so far). Its
    stderr is drained by a thread: a full pipe would stall the server at its next access-log line."""
    env = {**os.environ, "METAEOL_CACHE": str(cache), "METAEOL_FAKE_DELAY": str(delay)}
    cmd = [sys.executable, "-m", "metaeol_edge", "serve", *FAKE, "-t", "prompteol", "--port", "0", *args]
    proc = subprocess.Popen([*cmd, "--model", str(fake_model)], env=env, stderr=subprocess.PIPE, text=True)
    url = None
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline and url is None:
        line = proc.stderr.readline()
        lines.append(line)
        if "serving" in line and "http://" in line:
            url = line.strip().split(" on ")[-1]
    if url is None:
        proc.kill()
    assert url, "".join(lines)
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    proc.drained = drain  # joined once the process has exited
    return proc, url, lines


def _waiting(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("metaeol_queue_depth{"))


def test_sigterm_answers_every_accepted_request_exits_in_seconds_and_keeps_the_cache(tmp_path, fake_model):
    # 0.05 s a sentence, 8 a batch: the six big requests below are 12 s of work; SIGTERM comes after 1.
    cache = tmp_path / "c.sqlite3"
    proc, url, lines = _serve_process(fake_model, cache, "--batch-size", "8", delay=0.05)
    big = [[f"Sentence {i} of client {k}, about {w}." for i, w in enumerate(["cats", "rain", "tea", "maps"] * 10)]
           for k in range(6)]  # fmt: skip
    small = [["A cat sleeps."], ["A kitten naps."]]

    def client(batch):
        with httpx.Client(base_url=url, timeout=30) as c:
            return batch, c.post("/v1/embeddings", json={"model": fake_model.stem, "input": batch})

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, b) for b in big]
            deadline = time.time() + 20
            while _waiting(url) < 6 and time.time() < deadline:
                time.sleep(0.05)
            futures += [pool.submit(client, b) for b in small]

            def accepted() -> bool:  # both small ones held by the server (waiting, or done)
                return _waiting(url) + sum(f.done() for f in futures[6:]) >= 8

            held = accepted()
            while not held and time.time() < deadline:
                time.sleep(0.02)
                held = accepted()
            assert held, "the requests never reached the server"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=30) for f in futures]  # a transport error or a hang fails here
            assert proc.wait(timeout=30) == 0
            took = time.monotonic() - t0
    finally:
        proc.kill()
    proc.drained.join(10)
    err = "".join(lines)
    assert "Traceback" not in err and "stopped" in err, err
    assert took < 5, took  # the batch running (0.4 s) and the shutdown, not the 12 s of work
    completed = []
    for batch, r in answers:
        if r.status_code == 200:
            assert len(r.json()["data"]) == len(batch)
            completed.extend(batch)
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert sum(r.status_code == 503 for _, r in answers) >= 6  # the big ones had work left
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with fake(fake_model, "prompteol", cache=cache) as m:
        _, stats = counted(m, completed)
    assert (stats.hits, stats.misses) == (len(completed), 0)  # every answered request's vectors were kept


def test_a_second_signal_exits_at_once(tmp_path, fake_model):
    # A batch of 64 at 0.05 s a sentence: 3.2 s, which the first SIGTERM would wait for.
    proc, url, lines = _serve_process(fake_model, tmp_path / "c.sqlite3", "--batch-size", "64", delay=0.05)
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(httpx.post, f"{url}/v1/embeddings", json={"input": [f"S {i}." for i in range(128)]}, timeout=30)
            time.sleep(0.5)  # the first batch is running
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - t0
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGTERM and took < 1.5, (rc, took)
    proc.drained.join(10)
    assert "second signal: exiting now" in "".join(lines)


def test_the_serve_command_refuses_bad_options_clearly(capsys):
    from metaeol_edge.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be 0..65535" in capsys.readouterr().err
    assert main(["serve", "--max-inputs", "0"]) == 2
    assert "--max-inputs must be positive" in capsys.readouterr().err
    assert main(["serve", "--model", "a=smollm2-135m", "--model", "a=gemma3-270m"]) == 2
    assert "same name" in capsys.readouterr().err


def test_in_process_adapters_give_the_vectors_of_encode(fake_model, expected):
    lc = pytest.importorskip("metaeol_edge.integrations.langchain", exc_type=ImportError)
    li = pytest.importorskip("metaeol_edge.integrations.llama_index", exc_type=ImportError)
    with fake(fake_model, "prompteol", cache=False) as model:
        emb = lc.MetaEOLEmbeddings(model)
        _same(emb.embed_documents(SENTENCES), expected, SENTENCES)
        _same([emb.embed_query("Hi")], expected, ["Hi"])
        assert emb.embed_documents([]) == []
        index = li.MetaEOLEmbedding(model)
        _same(index.get_text_embedding_batch(SENTENCES), expected, SENTENCES)
        _same([index.get_query_embedding("Hi")], expected, ["Hi"])
    made = lc.MetaEOLEmbeddings(fake_model, templates="prompteol", cache=False, backend="fake")
    _same([made.embed_query("Hi")], expected, ["Hi"])
    made.model.close()


@pytest.mark.slow
def test_end_to_end_a_real_model_served_over_both_apis(smollm2):
    """The server face on the real engine: what the fake-backend tests above check, once with llama.cpp."""
    with MetaEOL(smollm2, "prompteol", cache=False) as m:
        want = m.encode(SENTENCES)
    model = MetaEOL(smollm2, "prompteol", cache=False)
    running = _Running({"smollm2-135m": ModelWorker("smollm2-135m", model, Limits())})
    try:
        with httpx.Client(base_url=running.url, timeout=120) as c:
            r = c.post("/v1/embeddings", json={"model": "smollm2-135m", "input": SENTENCES})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] > 0
            assert _vectors([d["embedding"] for d in r.json()["data"]]).tobytes() == want.tobytes()
            r = c.post("/api/embed", json={"model": "smollm2-135m", "input": SENTENCES[:2]})
            assert r.status_code == 200 and _vectors(r.json()["embeddings"]).tobytes() == want[:2].tobytes()
            assert c.get("/api/tags").json()["models"][0]["details"]["embedding_length"] == 576
    finally:
        running.stop()
