"""Issue 30's data-loss and bad-input items: each test failed before its fix.

Most need no model; the one that builds ``MetaEOL`` objects never loads one
(the backend is opened on the first ``encode``)."""

from __future__ import annotations

import sqlite3
import warnings

import numpy as np
import pytest
from metaeol_edge.cache import CacheKey, EmbeddingCache

from metaeol_edge import MetaEOL
from metaeol_edge.core.config import EmbedConfig


def _key(sentence: str, model: str = "m" * 64) -> CacheKey:
    return CacheKey(model, "T *sent 0*", -1, True, "float32", 512, sentence)


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if ".unusable-" in p.name]


# -- item 1: a closed cache is not a damaged one ------------------------------------------


def test_closed_cache_is_not_moved_aside(tmp_path):
    path = tmp_path / "c.sqlite3"
    cache = EmbeddingCache(path)
    v = np.ones(8, dtype=np.float32)
    cache.put_many([(_key("a"), "model", "task", v)])
    cache.close()
    with pytest.warns(UserWarning, match="used after close"):
        assert cache.get_many([_key("a")]) == {}
    cache.put_many([(_key("b"), "model", "task", v)])  # stores nothing, fails nothing
    assert _leftovers(tmp_path) == []
    again = EmbeddingCache(path)
    assert np.array_equal(again.get_many([_key("a")])[_key("a")], v)
    again.close()


def test_closed_connection_of_an_open_cache_is_not_damage(tmp_path):
    # The error a closed connection raises, met while the cache itself is open (a bug,
    # not damage): it is raised, and the file stays where it is.
    cache = EmbeddingCache(tmp_path / "c.sqlite3")
    cache.db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        cache.get_many([_key("a")])
    assert _leftovers(tmp_path) == []
    cache.close()


def test_real_damage_is_still_moved_aside(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite3")

    def damaged(db: sqlite3.Connection) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    with pytest.warns(UserWarning, match="is damaged"):
        cache._run(damaged, None, write=False)
    assert len(_leftovers(tmp_path)) == 1
    cache.close()


def test_shared_cache_outlives_the_first_model_closed(tmp_path, smollm2):
    path = tmp_path / "shared.sqlite"
    cache = EmbeddingCache(path)
    first = MetaEOL(smollm2, cache=cache)
    second = MetaEOL(smollm2, cache=cache)
    first.close()
    assert second.cache is cache
    v = np.ones(8, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "used after close", no "damaged"
        cache.put_many([(_key("a"), "model", "task", v)])
        assert np.array_equal(cache.get_many([_key("a")])[_key("a")], v)
    second.close()
    assert not cache._closed  # its opener closes it
    cache.close()
    assert _leftovers(tmp_path) == []
    own = MetaEOL(smollm2, cache=tmp_path / "own.sqlite")
    opened = own.cache
    own.close()
    assert opened is not None and opened._closed  # a cache it opened itself it closes


# -- item 2: `cache clear --model` matches exactly -------------------------------------------


def _two_models(path) -> EmbeddingCache:
    cache = EmbeddingCache(path)
    v = np.ones(4, dtype=np.float32)
    cache.put_many(
        [
            (_key("a", model="ab" * 32), "m1", "task", v),
            (_key("b", model="ab" * 32), "m1", "task", v),
            (_key("a", model="f" * 64), "m2", "task", v),
        ]
    )
    return cache


@pytest.mark.parametrize("model", ["%", "m_", "m%", "ab", "abab", "ababab_", "fff"])
def test_cache_clear_takes_no_wildcards_nor_short_prefixes(tmp_path, model):
    from metaeol_edge.errors import InputError

    cache = _two_models(tmp_path / "c.sqlite3")
    with pytest.raises(InputError, match="no model in the cache is"):
        cache.clear(model=model)
    assert cache.stats()["entries"] == 3
    cache.close()


def test_cache_clear_by_label_or_long_prefix(tmp_path):
    cache = _two_models(tmp_path / "c.sqlite3")
    assert cache.clear_plan(model="FFFFFFFF") == [{"model": "m2", "fingerprint": "f" * 12, "entries": 1}]
    assert cache.clear(model="FFFFFFFF") == 1
    assert cache.clear_plan(model="m1") == [{"model": "m1", "fingerprint": "ab" * 6, "entries": 2}]
    assert cache.clear(model="m1") == 2
    assert cache.stats()["entries"] == 0
    cache.close()


def test_cli_cache_clear_says_what_goes(tmp_path, monkeypatch, capsys):
    from metaeol_edge import cli

    path = tmp_path / "c.sqlite3"
    _two_models(path).close()
    monkeypatch.setenv("METAEOL_CACHE", str(path))
    with warnings.catch_warnings():  # main() installs its own warning printer
        assert cli.main(["cache", "clear", "--model", "%"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no model in the cache is '%'" in err
        assert cli.main(["cache", "clear", "--model", "m1"]) == 0
    out = capsys.readouterr().out
    assert "deleting 2 entries of m1 (fingerprint abababababab)" in out and "deleted 2 entries" in out
    cache = EmbeddingCache(path)
    assert cache.stats()["entries"] == 1
    cache.close()


# -- item 3: a rerun with another batch size keeps the finished shards -------------------------


def _fake_job(tmp_path):
    from types import SimpleNamespace

    from metaeol_edge import bulk

    source_file = tmp_path / "in.txt"
    source_file.write_text("a\nb\n", encoding="utf-8")
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    model = SimpleNamespace(
        units=[SimpleNamespace(key="unit")],
        model_path=model_file,
        model_label="m",
        method=SimpleNamespace(name="metaeol"),
        layers=(-1,),
    )
    source = bulk.Source(source_file)

    def identity(batch_size: int, **options) -> dict:
        options = {"model": "m", "cache_dtype": "float32"} | options
        return bulk.job_identity(
            source, 2, 1, model, EmbedConfig.of(**options), bulk.EncodeOptions(batch_size=batch_size)
        )

    folder = tmp_path / "out.npy.shards"
    return folder, identity


def _start(folder, stamp: dict) -> None:
    import json

    folder.mkdir()
    (folder / "job.json").write_text(json.dumps(stamp), encoding="utf-8")
    np.save(folder / "00000000.npy", np.zeros((1, 1, 4), dtype=np.float32))


def test_bulk_rerun_with_another_batch_size_resumes(tmp_path):
    from metaeol_edge import bulk

    folder, identity = _fake_job(tmp_path)
    _start(folder, identity(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "starting over"
        assert bulk._prepare(folder, identity(64)) == {0}
        assert bulk._prepare(folder, identity(64, cache=False)) == {0}  # the cache on or off decides nothing
    with pytest.warns(UserWarning, match="starting over"):
        assert bulk._prepare(folder, identity(64, cache_dtype="float16")) == set()  # float16 rounding does


def test_bulk_job_of_0_2_with_batch_size_in_its_identity_resumes(tmp_path):
    from metaeol_edge import bulk

    folder, identity = _fake_job(tmp_path)
    old = identity(8, cache=True)
    old["encode"]["batch_size"] = 8  # what 0.2 wrote
    old["options"]["cache"] = True
    _start(folder, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bulk._prepare(folder, identity(16)) == {0}


# -- item 4: two jobs of one output at once ------------------------------------------------


def test_second_bulk_job_of_one_output_is_refused_at_once(tmp_path, monkeypatch, capsys):
    from metaeol_edge import bulk, cli
    from metaeol_edge.errors import InputError

    source = tmp_path / "in.txt"
    source.write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    with bulk.job_lock(out):  # the first job, running
        with pytest.raises(InputError, match="another job is writing"):
            bulk.embed_file(source, out, {"model": "no-such-model"})  # refused before the model is looked up
        with warnings.catch_warnings():
            assert cli.main(["embed", "-i", str(source), "-o", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another job is writing" in err
    assert not (tmp_path / "out.npy.shards").exists()  # the refused job left nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # nor a lock file once the first is done
    with bulk.job_lock(out):  # and the next job gets it
        pass


def test_job_lock_is_released_by_an_exception(tmp_path):
    from metaeol_edge import bulk

    out = tmp_path / "out.npy"
    with pytest.raises(RuntimeError), bulk.job_lock(out):
        raise RuntimeError("the job failed")
    with bulk.job_lock(out):
        pass


def test_bulk_job_under_its_lock_writes_its_output_and_no_lock_file(tmp_path, fake_model):
    from metaeol_edge import bulk

    source = tmp_path / "in.txt"
    source.write_text("A man plays a guitar.\nSomeone is making music.\n", encoding="utf-8")
    out = tmp_path / "out.npy"
    options = {"model": str(fake_model), "backend": "fake", "cache": False}
    report = bulk.embed_file(source, out, options, workers=1, show_progress=False)
    assert report.rows == 2 and np.load(out).shape[-2] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.npy"]


# -- item 10 and 12: bad requests and keys of the server ---------------------------------------


def _client(lines: list[str] | None = None, api_key: str | None = None):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from metaeol_edge.server import create_app

    log = lines.append if lines is not None else (lambda line: None)
    return TestClient(create_app({}, api_key=api_key, log=log), raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"input": "a", "dimensions": ' + "7" * 5000 + "}", "over 4300 digits"),
        ("[" * 100_000, "nests arrays or objects too deeply"),
        ('{"input": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests arrays or objects too deeply"),
    ],
    ids=["5000-digit-dimensions", "nested-brackets", "nested-input"],
)
def test_server_answers_400_to_unreadable_json(body, says):
    with _client() as client:
        r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_server_log_escapes_the_request_path():
    import asyncio

    pytest.importorskip("fastapi")
    from metaeol_edge.server import create_app

    lines: list[str] = []
    app = create_app({}, log=lines.append)
    # The scope uvicorn makes of "GET /a%0Aforged%22%1B": its path percent-decoded.
    path = '/a\nforged"\x1b'
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": b"/a%0Aforged%22%1B", "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 404
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0]
    assert '"GET /a\\nforged\\"\\x1b" 404' in lines[0]


def test_error_messages_say_an_integer():
    from metaeol_edge.server import ApiError, Limits, parse_inputs

    from metaeol_edge.errors import kind_of

    assert kind_of(3) == "an integer" and kind_of(object()) == "an object" and kind_of([]) == "a list"
    with pytest.raises(ApiError, match=r"input\[1\] must be a string, not an integer"):
        parse_inputs({"input": ["a", 1]}, Limits())


@pytest.mark.parametrize("key", ["", "   ", "clé", "tab\tkey", " padded "])
def test_unusable_api_keys_are_refused_at_start(key, monkeypatch, capsys):
    from metaeol_edge import cli

    # --model names nothing loadable: a refusal must come before any model is looked up.
    with warnings.catch_warnings():
        assert cli.main(["serve", "--model", "no-such-model", "--api-key", key]) == 2
        first = capsys.readouterr().err
        monkeypatch.setenv("METAEOL_API_KEY", key)
        assert cli.main(["serve", "--model", "no-such-model"]) == 2
        second = capsys.readouterr().err
    assert first.count("\n") == 1 and first.startswith("error: --api-key ")
    assert second.count("\n") == 1 and second.startswith("error: METAEOL_API_KEY ")


def test_empty_api_key_is_refused_by_the_app_too():
    from metaeol_edge.errors import InputError

    with pytest.raises(InputError, match="is empty"):
        _client(api_key="")
    with _client(api_key="k") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


# -- items 13 and 14: Parquet ids and text columns --------------------------------------------


def _parquet(path, **columns):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_text_columns_of_every_string_layout_are_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from metaeol_edge.corpus import count_sentences, iter_records

    texts = ["A cat.", "A dog.", "A cat."]
    layouts = {"dictionary": pa.array(texts).dictionary_encode(), "view": pa.array(texts, pa.string_view())}
    for name, column in layouts.items():
        path = _parquet(tmp_path / f"{name}.parquet", text=column, doc=pa.array(["a", "b", "c"]).dictionary_encode())
        assert str(pq.ParquetFile(path).schema_arrow.field("text").type) == str(column.type)  # still that layout
        assert [t for _, t in iter_records(path, id_column="doc")] == texts
        assert [i for i, _ in iter_records(path, id_column="doc")] == ["a", "b", "c"]
        assert count_sentences(path) == 3


def test_unwritable_or_null_parquet_ids_are_refused_before_any_work(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from metaeol_edge.corpus import count_sentences

    from metaeol_edge.errors import InputError

    texts = pa.array(["A cat.", "A dog."])
    nested = _parquet(tmp_path / "nested.parquet", text=texts, doc=pa.array([[1], [2]]))
    with pytest.raises(InputError, match="id column .doc. holds list<"):
        count_sentences(nested, id_column="doc")
    nulls = _parquet(tmp_path / "nulls.parquet", text=texts, doc=pa.array([1, None]))
    with pytest.raises(InputError, match="row 2: the id 'doc' is null"):
        count_sentences(nulls, id_column="doc")


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (['{"text": "a", "id": 1}', '{"text": "b", "id": "x"}'], "line 2: the id 'id' is a string, but the ids"),
        (['{"text": "a", "id": null}'], "line 1: the id 'id' is null"),
        (['{"text": "a", "id": [1]}'], "line 1: the id 'id' is an array"),
        (['{"text": "a", "id": ' + str(2**64) + "}"], "does not fit in 64 bits"),
    ],
)
def test_mixed_or_null_jsonl_ids_are_refused_before_any_work(tmp_path, lines, says):
    from metaeol_edge.corpus import count_sentences

    from metaeol_edge.errors import InputError

    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=says):
        count_sentences(path, id_column="id")


def test_jsonl_output_writes_timestamp_decimal_and_binary_ids(tmp_path):
    import datetime as dt
    import decimal
    import json

    from metaeol_edge.corpus import VectorWriter

    ids = [
        dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc),
        decimal.Decimal("12.50"),
        b"\x00\xff",
        dt.date(2024, 5, 1),
    ]
    out = tmp_path / "out.jsonl"
    with VectorWriter(out, len(ids), (2,), ids=True) as writer:
        writer.write(["a"] * len(ids), np.zeros((len(ids), 2), dtype=np.float32), ids)
    got = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert got == ["2024-05-01T12:30:00+00:00", "12.50", "AP8=", "2024-05-01"]


def test_parquet_output_keeps_the_inputs_id_type(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import decimal

    import pyarrow.parquet as pq
    from metaeol_edge.corpus import VectorWriter

    decimals = pa.decimal128(6, 2)
    out = tmp_path / "out.parquet"
    # The first batch alone would be inferred as decimal128(3, 2), and the second would not fit.
    with VectorWriter(out, 2, (2,), ids=True, id_type=decimals) as writer:
        writer.write(["a"], np.zeros((1, 2), dtype=np.float32), [decimal.Decimal("1.50")])
        writer.write(["b"], np.zeros((1, 2), dtype=np.float32), [decimal.Decimal("1234.50")])
    column = pq.read_table(out).column("id")
    assert column.type == decimals and column.to_pylist() == [decimal.Decimal("1.50"), decimal.Decimal("1234.50")]


def test_parquet_with_timestamp_ids_and_a_dictionary_text_column_to_jsonl(tmp_path, fake_model):
    pa = pytest.importorskip("pyarrow")
    import json

    from metaeol_edge import bulk

    stamps = pa.array([1_700_000_000_000_000_001, 1_700_000_000_000_000_002], pa.timestamp("ns", tz="UTC"))
    texts = pa.array(["A man plays a guitar.", "Someone is making music."]).dictionary_encode()
    source = _parquet(tmp_path / "in.parquet", body=texts, at=stamps)
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"out.{suffix}"
        options = {"model": str(fake_model), "backend": "fake", "cache": tmp_path / "c.sqlite3"}
        bulk.embed_file(
            source, out, options, text_column="body", id_column="at", workers=1, shard_size=1, show_progress=False
        )
    got = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == ["2023-11-14T22:13:20.000000001+00:00", "2023-11-14T22:13:20.000000002+00:00"]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out.parquet").column("id").equals(pa.chunked_array([stamps]))


# -- items 5, 7, 8, 9, 11: the server --------------------------------------------------------


def _serving(fake_model, limits=None, api_key=None, **kwargs):
    """A real uvicorn server on 127.0.0.1 over the fake backend: (running, worker)."""
    pytest.importorskip("uvicorn")
    from conftest import fake
    from metaeol_edge.server import Limits, ModelWorker
    from test_server import _Running

    limits = limits or Limits()
    worker = ModelWorker("m", fake(fake_model, "prompteol", cache=False, **kwargs), limits)
    return _Running({"m": worker}, limits, api_key), worker


def test_tags_and_dimensions_never_wait_for_the_model(fake_model):
    httpx = pytest.importorskip("httpx")
    import threading

    running, worker = _serving(fake_model)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # what a long batch does: holds the model's lock
        with worker.model._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        worker.model._fingerprint = None  # would be hashed again, under the lock, if asked for
        with httpx.Client(base_url=running.url, timeout=5) as c:
            tags = c.get("/api/tags").json()["models"][0]
            assert tags["details"]["embedding_length"] == 576 and len(tags["digest"]) == 64
            r = c.post("/v1/embeddings", json={"input": "a", "dimensions": 100})
            assert r.status_code == 400 and "needs whitened vectors" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 200
    finally:
        release.set()
        holder.join(10)
        running.stop()


def _slow_worker(fake_model, monkeypatch, delay: float = 0.02, **limits):
    """A worker over the fake backend at ``delay`` seconds a sentence (PromptEOL: one prompt each)."""
    from conftest import fake
    from metaeol_edge.backends_fake import DELAY_VARIABLE
    from metaeol_edge.server import Limits, ModelWorker

    monkeypatch.setenv(DELAY_VARIABLE, str(delay))
    model = fake(fake_model, "prompteol", cache=False)
    return ModelWorker("m", model, Limits(**limits))


def _idle(worker, seconds: float = 10) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if worker.depth() == 0 and not worker.model._lock._is_owned():
            return True
        time.sleep(0.02)
    return False


def test_batches_take_one_sentence_per_client_and_request_in_turn(fake_model, monkeypatch):
    import threading

    worker = _slow_worker(fake_model, monkeypatch, delay=0, batch_size=4)
    release = threading.Event()
    seen: list[list[str]] = []
    real = worker.model.encode_batches

    def recording(sentences, *args, **kwargs):
        release.wait(30)
        seen.append(list(sentences))
        return real(sentences, *args, **kwargs)

    worker.model.encode_batches = recording
    try:
        hold = worker.submit(["x"], True, "z")  # the batch running while the others come
        assert _idle(worker) or worker.depth() == 0
        big = worker.submit([f"a{i}" for i in range(10)], True, "A")
        small_a = worker.submit(["b"], True, "A")  # the same client's second request
        small_b = worker.submit(["c"], True, "B")
        release.set()
        for f in (hold, big, small_a, small_b):
            f.result(30)
        assert seen[0] == ["x"]
        assert sorted(seen[1]) == sorted(["a0", "a1", "b", "c"])  # both small ones in the next batch
        assert [s for batch in seen[2:] for s in batch] == [f"a{i}" for i in range(2, 10)]
        assert big.result().vectors.shape == (10, 576)
    finally:
        release.set()
        worker.stop()
        worker.model.close()


def test_a_small_request_is_not_starved_by_a_big_one_and_dropped_work_is_not_computed(fake_model, monkeypatch):
    import time

    worker = _slow_worker(fake_model, monkeypatch, delay=0.02, batch_size=8)  # a batch: about 0.16 s
    try:
        big = worker.submit([f"Sentence number {i}." for i in range(400)], True, "127.0.0.1")  # 8 s alone
        time.sleep(0.3)
        t0 = time.monotonic()
        small = worker.submit(["A cat sleeps."], True, "127.0.0.1")
        small.result(30)
        assert time.monotonic() - t0 < 1.5  # one batch ahead of it, not the 400 sentences
        assert not big.done()
        big.cancel()  # the client left
        assert _idle(worker, 5)
        backend = worker.model.backend
        calls = backend.calls
        time.sleep(0.5)
        assert backend.calls == calls  # nothing more of it computed
    finally:
        worker.stop()
        worker.model.close()


def test_a_client_that_disconnects_has_its_work_dropped(fake_model, monkeypatch):
    httpx = pytest.importorskip("httpx")
    import time

    from metaeol_edge.backends_fake import DELAY_VARIABLE
    from metaeol_edge.server import Limits

    monkeypatch.setenv(DELAY_VARIABLE, "0.02")
    running, worker = _serving(fake_model, Limits(batch_size=8))
    try:
        with httpx.Client(base_url=running.url, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                c.post("/v1/embeddings", json={"input": [f"Sentence {i}." for i in range(400)]})
        assert _idle(worker, 5)  # dropped within a poll and a batch
        backend = worker.model.backend
        calls = backend.calls
        time.sleep(0.5)
        assert backend.calls == calls
        with httpx.Client(base_url=running.url, timeout=10) as c:
            assert c.post("/v1/embeddings", json={"input": "Hi"}).status_code == 200
    finally:
        running.stop()


LONG = "word " * 600  # 600 tokens on the fake tokenizer: over max_length 512


def test_openai_route_reports_truncation_and_refuses_it_when_asked(fake_model):
    httpx = pytest.importorskip("httpx")
    from conftest import fake

    with fake(fake_model, "prompteol", cache=False) as m, pytest.warns(UserWarning, match="truncated"):
        want = m.encode(["A cat.", LONG])
        short = m.token_counts(["A cat."])[0]
    running, _ = _serving(fake_model)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            for route in ("/v1/embeddings", "/api/embed"):
                r = c.post(route, json={"input": ["A cat.", LONG]})
                assert r.status_code == 200, r.text
                body = r.json()
                [cut] = body["truncated"]
                assert cut["index"] == 1 and cut["tokens"] >= 600 and 0 < cut["kept"] < 512
                assert r.headers["X-Truncated-Inputs"] == "1"
                used = body["usage"]["prompt_tokens"] if route == "/v1/embeddings" else body["prompt_eval_count"]
                assert used == short + cut["kept"]  # what was embedded, not the 600 tokens sent
                rows = [d["embedding"] for d in body["data"]] if route == "/v1/embeddings" else body["embeddings"]
                assert np.asarray(rows, dtype=np.float32).tobytes() == want.tobytes()
                r = c.post(route, json={"input": ["A cat."]})
                assert r.json()["truncated"] == [] and "X-Truncated-Inputs" not in r.headers
                r = c.post(route, json={"input": ["A cat.", LONG], "truncate": False})
                assert r.status_code == 400 and "sentence #2 needs" in r.json()["error"]["message"], r.text
                r = c.post(route, json={"input": "A cat.", "truncate": "yes"})
                assert r.status_code == 400 and "'truncate' must be true or false" in r.text
    finally:
        running.stop()


def test_no_truncate_server_answers_400_unless_the_request_asks_to_cut(fake_model):
    httpx = pytest.importorskip("httpx")

    running, _ = _serving(fake_model, truncate=False)  # metaeol serve --no-truncate
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            r = c.post("/v1/embeddings", json={"input": ["A cat.", LONG]})
            assert r.status_code == 400 and "over max_length 512 (truncation is off)" in r.json()["error"]["message"]
            assert c.post("/v1/embeddings", json={"input": "A cat."}).status_code == 200
            r = c.post("/v1/embeddings", json={"input": LONG, "truncate": True})
            assert r.status_code == 200 and r.json()["truncated"][0]["index"] == 0
    finally:
        running.stop()


def test_truncation_is_reported_per_request_when_requests_share_a_batch(fake_model, monkeypatch):
    import threading

    worker = _slow_worker(fake_model, monkeypatch, delay=0, batch_size=16)
    release = threading.Event()
    real = worker.model.encode_batches
    worker.model.encode_batches = lambda *a, **k: (release.wait(30), real(*a, **k))[1]
    try:
        hold = worker.submit(["x"], True, "z")
        assert _idle(worker)
        a = worker.submit(["A cat.", LONG, "A dog."], True, "A")
        b = worker.submit([LONG], True, "B")
        c = worker.submit(["A bird.", LONG], False, "C")  # refused: its own error, the others unharmed
        release.set()
        with pytest.warns(UserWarning, match="truncated"):
            ra, rb = a.result(30), b.result(30)
        hold.result(30)
        assert [t.index for t in ra.stats.truncated] == [1] and [t.index for t in rb.stats.truncated] == [0]
        kept = rb.stats.truncated[0].kept
        assert rb.tokens == kept and ra.tokens == kept + sum(worker.model.token_counts(["A cat.", "A dog."]))
        with pytest.raises(Exception, match="sentence #2 needs"):
            c.result(30)
    finally:
        release.set()
        worker.stop()
        worker.model.close()


def test_a_chunked_body_is_refused_as_it_passes_the_limit_not_after():
    import asyncio

    pytest.importorskip("fastapi")
    from metaeol_edge.server import Limits, create_app

    app = create_app({}, Limits(max_body_bytes=100_000), log=lambda line: None)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "query_string": b"", "root_path": "",
        "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    chunk = b" " * 65536
    read = [0]

    async def receive() -> dict:  # a client streaming 1 GB without a Content-Length
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": read[0] < 1 << 30}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert b"over the limit of 100000 bytes" in b"".join(m.get("body", b"") for m in sent)
    assert read[0] <= 100_000 + 2 * len(chunk)  # read no further than the limit


# -- item 6: where a vector was computed is part of its key -----------------------------------


def test_gpu_offload_puts_the_device_in_the_cache_key_and_cpu_keys_stay(fake_model, monkeypatch):
    from metaeol_edge import MetaEOL, backends

    tag = backends.llama_cpp_cache_tag
    monkeypatch.setattr(backends, "gpu_device", lambda: "cuda")
    assert tag({"mode": "one-at-a-time"}) == "" and tag({"mode": "packed", "n_gpu_layers": 0}) == "packed"
    assert tag({"mode": "packed", "n_gpu_layers": -1}) == "packed-gpu-cuda-nglall"
    assert tag({"mode": "one-at-a-time", "n_gpu_layers": 12}) == "gpu-cuda-ngl12"  # part offloaded: other bits
    assert tag({"mode": "packed", "align": 8, "n_gpu_layers": 99}) == "packed-align8-gpu-cuda-ngl99"
    cpu = MetaEOL(fake_model, cache=False)
    gpu = MetaEOL(fake_model, cache=False, n_gpu_layers=-1, engine_mode="one-at-a-time")
    assert cpu._vector_source() == cpu.fingerprint  # 0.2's key
    assert gpu._vector_source() == f"{cpu.fingerprint}@gpu-cuda-nglall"
    assert cpu.cache_keys("A cat.")[0] != gpu.cache_keys("A cat.")[0]
    monkeypatch.setattr(backends, "gpu_device", lambda: None)  # a build without offload: CPU bits, CPU keys
    assert MetaEOL(fake_model, cache=False, n_gpu_layers=-1, engine_mode="one-at-a-time")._vector_source() == (
        cpu.fingerprint
    )


def test_gpu_device_names_the_offload_backend(monkeypatch):
    from types import SimpleNamespace

    from metaeol_edge import backends, llamacpp

    info = b"CUDA : ARCHS = 890 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX2 = 1 | "
    fake_lc = SimpleNamespace(llama_supports_gpu_offload=lambda: True, llama_print_system_info=lambda: info)
    monkeypatch.setattr(llamacpp, "_llama", lambda: fake_lc)
    monkeypatch.setattr(backends, "_GPU_DEVICE", None)
    assert backends.gpu_device() == "cuda"
    fake_lc.llama_supports_gpu_offload = lambda: False
    monkeypatch.setattr(backends, "_GPU_DEVICE", None)
    assert backends.gpu_device() is None


# -- item 12: --api-key-file, hub listing names, registry download size ------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read --api-key-file"),
        ("", "is empty"),
        ("\n", "is empty"),
        ("key\nmore\n", "must hold one line"),
        ("clé\n", "not printable ASCII"),
    ],
    ids=["missing", "empty", "newline-only", "two-lines", "non-ascii"],
)
def test_api_key_file_is_read_and_checked_before_any_model(tmp_path, content, says, capsys):
    from metaeol_edge import cli

    path = tmp_path / "key"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with warnings.catch_warnings():
        assert cli.main(["serve", "--model", "no-such-model", "--api-key-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_api_key_file_with_a_good_key_gets_to_the_model(tmp_path, capsys):
    from metaeol_edge.cli import _read_key

    from metaeol_edge import cli

    path = tmp_path / "key"
    path.write_text("s3cret-key\n", encoding="utf-8")
    assert _read_key(str(path)) == "s3cret-key"
    with warnings.catch_warnings():
        assert cli.main(["serve", "--model", "no-such-model", "--api-key-file", str(path)]) == 2
        assert "unknown model id 'no-such-model'" in capsys.readouterr().err  # past the key
        assert cli.main(["serve", "--api-key", "k", "--api-key-file", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
