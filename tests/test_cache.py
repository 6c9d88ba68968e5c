import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import counted, fake
from metaeol_edge.backends_fake import DELAY_VARIABLE
from metaeol_edge.cache import SCHEMA_VERSION, CacheKey, EmbeddingCache
from metaeol_edge.prompts import TemplateSet, load_templates


def _key(sentence, template="T *sent 0*", dtype="float32", model="m" * 64):
    return CacheKey(model, template, -1, True, dtype, 512, sentence)


# -- the store itself -------------------------------------------------------------


def test_round_trip_and_dtypes(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite3")
    v = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    cache.put_many([(_key("a"), "model", "task", v), (_key("a", dtype="float16"), "model", "task", v)])
    got = cache.get_many([_key("a"), _key("a", dtype="float16"), _key("b")])
    assert np.array_equal(got[_key("a")], v)
    assert np.array_equal(got[_key("a", dtype="float16")], v.astype(np.float16).astype(np.float32))
    assert _key("b") not in got
    sizes = dict(cache.db.execute("SELECT dtype, length(vector) FROM embeddings").fetchall())
    assert sizes == {"float32": 4 * 576, "float16": 2 * 576}


def test_every_key_part_matters():
    base = _key("s")
    variants = [
        _key("s2"),
        _key("s", template="U *sent 0*"),
        _key("s", dtype="float16"),
        _key("s", model="n" * 64),
        CacheKey(base.model, base.template, 5, True, "float32", 512, "s"),
        CacheKey(base.model, base.template, -1, False, "float32", 512, "s"),
        CacheKey(base.model, base.template, -1, True, "float32", 256, "s"),
    ]
    assert len({base.digest(), *(v.digest() for v in variants)}) == 1 + len(variants)


def test_schema_is_versioned_and_migrated_once(tmp_path):
    path = tmp_path / "c.sqlite3"
    EmbeddingCache(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="newer than this release"):
        EmbeddingCache(path)
    with pytest.warns(UserWarning, match="newer than this release.*running without a cache"):
        assert EmbeddingCache.open(path) is None
    assert path.exists()  # a newer release's cache is left alone


def test_corrupt_file_is_moved_aside_with_a_warning(tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.warns(UserWarning, match="moved it to"):
        cache = EmbeddingCache.open(path)
    assert cache is not None and cache.get_many([_key("a")]) == {}
    assert any(p.name.startswith("c.sqlite3.unusable-") for p in tmp_path.iterdir())


def test_foreign_database_is_moved_aside(tmp_path):
    path = tmp_path / "c.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    with pytest.warns(UserWarning, match="did not create"):
        cache = EmbeddingCache.open(path)
    assert cache is not None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("c.sqlite3.unusable-")]
    assert len(aside) == 1 and sqlite3.connect(aside[0]).execute("SELECT * FROM photos").fetchall() == []


@pytest.mark.parametrize("where", ["under-a-file", "sysfs"])
def test_unwritable_location_falls_back_to_no_cache(tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "c.sqlite3"
    else:
        path = "/sys/metaeol-test/c.sqlite3"
    with pytest.warns(UserWarning, match="running without a cache"):
        assert EmbeddingCache.open(path) is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only files")
def test_read_only_cache_file_falls_back_to_no_cache(tmp_path):
    path = tmp_path / "ro" / "c.sqlite3"
    EmbeddingCache(path).close()
    for p in path.parent.iterdir():
        p.chmod(0o444)
    path.parent.chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="running without a cache"):
            assert EmbeddingCache.open(path) is None
    finally:
        path.parent.chmod(0o755)


def test_size_cap_evicts_least_recently_used(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite3", max_bytes=10 * (400 + 48))
    v = np.ones(100, dtype=np.float32)
    for i in range(10):
        cache.put_many([(_key(f"s{i}"), "m", "t", v)])
        cache.db.execute("UPDATE embeddings SET last_used = ? WHERE key = ?", (i, _key(f"s{i}").digest()))
    cache.touch([_key("s0")])  # s0 is now the most recently used
    cache.put_many([(_key("new"), "m", "t", v)])
    left = cache.get_many([_key(f"s{i}") for i in range(10)] + [_key("new")])
    assert _key("new") in left and _key("s0") in left and _key("s1") not in left
    assert len(left) == 10


def test_size_cap_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_CACHE_MAX_MB", "0.002")
    cache = EmbeddingCache.open(tmp_path / "c.sqlite3")
    v = np.ones(100, dtype=np.float32)
    cache.put_many([(_key(f"s{i}"), "m", "t", v) for i in range(10)])
    assert cache.max_bytes == 2000 and cache.stats()["entries"] == 4  # 4 x (400 + 48) <= 2000


def test_clear_by_template_and_model(tmp_path):
    cache = EmbeddingCache(tmp_path / "c.sqlite3")
    v = np.ones(4, dtype=np.float32)
    cache.put_many(
        [
            (_key("a", template="A *sent 0*"), "m1", "alpha", v),
            (_key("a", template="B *sent 0*"), "m1", "beta", v),
            (_key("a", model="f" * 64), "m2", "alpha", v),
        ]
    )
    assert cache.clear(template="beta") == 1
    assert cache.clear(model="m2") == 1
    assert cache.stats()["entries"] == 1
    assert cache.clear() == 1


# -- through MetaEOL -------------------------------------------------------------------
# The cache's logic is the subject, not the engine's numbers: these run the fake backend (conftest
# ``fake_model``). That the engine gives a prompt the same bits whatever runs beside it, which makes a
# warm run equal a cold one on a real model, is test_engine.py's
# test_a_prompts_vector_does_not_depend_on_what_runs_beside_it (and test_golden.py's cache test).


@pytest.fixture
def cache_path(tmp_path):
    return tmp_path / "cache.sqlite3"


def test_partial_hits_equal_a_cold_run_bit_for_bit(fake_model, sts_sentences, cache_path):
    sentences = sts_sentences[:10]
    with fake(fake_model, cache=False) as cold_model:
        cold = cold_model.encode(sentences, per_template=True)
    with fake(fake_model, cache=cache_path) as m:
        _, st = counted(m, sentences[2:5] + sentences[8:9])  # warm a few sentences
        assert (st.hits, st.misses) == (0, 4 * 8)
        mixed, st = counted(m, sentences, per_template=True)
        assert (st.hits, st.misses) == (4 * 8, 6 * 8)
        assert np.array_equal(mixed, cold)
        again, st = counted(m, sentences, per_template=True)
        assert (st.hits, st.misses) == (10 * 8, 0)
        assert np.array_equal(again, cold)
        stats = m.cache.stats()
    assert stats["entries"] == 80 and len(stats["groups"]) == 8
    assert stats["runs"][0]["hits"] == 80


def test_float16_cache_gives_the_same_vectors_warm_and_cold(fake_model, sts_sentences, cache_path):
    with fake(fake_model, templates="prompteol", cache=cache_path, cache_dtype="float16") as m:
        cold = m.encode(sts_sentences[:3])
        warm, st = counted(m, sts_sentences[:3])
        assert st.misses == 0 and np.array_equal(cold, warm)


def test_template_sets_share_entries_and_a_changed_template_is_recomputed(fake_model, sts_sentences, cache_path):
    metaeol = load_templates("metaeol")
    custom = TemplateSet(
        "mine", (metaeol.templates[2], metaeol.templates[5]) + load_templates("prompteol").templates, "test"
    )
    with fake(fake_model, cache=cache_path) as m:
        full = m.encode(sts_sentences[:3], per_template=True)
    with fake(fake_model, templates=custom, cache=cache_path) as m:
        mine, st = counted(m, sts_sentences[:3], per_template=True)
        assert (st.hits, st.misses) == (3 * 2, 3 * 1)  # only the new template ran
    assert np.array_equal(mine[:, 0], full[:, 2]) and np.array_equal(mine[:, 1], full[:, 5])


def test_the_model_file_is_part_of_the_key(fake_model, tmp_path, sts_sentences, cache_path):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(fake_model.read_bytes())
    with fake(fake_model, templates="prompteol", cache=cache_path) as a:
        a.encode(sts_sentences[:2])
        reg_fp = a.fingerprint
    with fake(copy, templates="prompteol", cache=cache_path) as b:
        _, st = counted(b, sts_sentences[:2])
        assert b.fingerprint == reg_fp and st.hits == 2  # same bytes, same key
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # the last byte is tensor data
    copy.write_bytes(bytes(data))
    with fake(copy, templates="prompteol", cache=cache_path) as c:
        _, st = counted(c, sts_sentences[:2])
        assert c.fingerprint != reg_fp and st.hits == 0


def test_no_cache_means_no_file(fake_model, sts_sentences, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_CACHE", str(tmp_path / "never.sqlite3"))
    with fake(fake_model, templates="prompteol", cache=False) as m:
        m.encode(sts_sentences[:1])
    assert not (tmp_path / "never.sqlite3").exists()


WORKER = textwrap.dedent("""
    import sys
    import json
    from metaeol_edge import EncodeStats, MetaEOL
    path, cache, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sentences = json.load(open(sys.argv[5], encoding="utf-8"))[start:stop]
    # The fake backend: the subject is the cache file shared by two processes, not the engine.
    with MetaEOL(path, templates="prompteol", cache=cache, backend="fake") as m:
        stats = EncodeStats()
        m.encode(sentences, batch_size=1, stats=stats)
        print("done", stats.hits, stats.misses, flush=True)
""")


def _worker(tmp_path, model, cache_path, start, stop, sts_file):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [sys.executable, str(script), str(model), str(cache_path), str(start), str(stop), str(sts_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def sts_file(sts_sentences, tmp_path):
    path = tmp_path / "sentences.json"
    path.write_text(json.dumps(sts_sentences), encoding="utf-8")
    return path


def _distinct(sts_sentences, start, stop):
    return list(dict.fromkeys(s.strip() for s in sts_sentences[start:stop]))


def test_two_processes_write_one_cache_without_errors_or_losses(
    fake_model, sts_sentences, tmp_path, cache_path, sts_file, monkeypatch
):
    monkeypatch.setenv(DELAY_VARIABLE, "0.05")  # 1.5 s of work each, as smollm2's: the two runs overlap
    a = _worker(tmp_path, fake_model, cache_path, 0, 30, sts_file)
    b = _worker(tmp_path, fake_model, cache_path, 15, 45, sts_file)  # overlapping sentences
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert out.startswith("done")
        assert "Warning" not in err, err  # e.g. one process moving the other's new cache aside
    monkeypatch.delenv(DELAY_VARIABLE)
    expected = _distinct(sts_sentences, 0, 45)
    with fake(fake_model, templates="prompteol", cache=cache_path) as m:
        warm, st = counted(m, expected)
        assert (st.hits, st.misses) == (len(expected), 0)
    with fake(fake_model, templates="prompteol", cache=False) as m:
        assert np.array_equal(warm, m.encode(expected))


def test_sigkill_mid_run_keeps_every_committed_entry(
    fake_model, sts_sentences, tmp_path, cache_path, sts_file, monkeypatch
):
    monkeypatch.setenv(DELAY_VARIABLE, "0.02")  # 8 s for the 400 sentences: the kill lands mid-run
    p = _worker(tmp_path, fake_model, cache_path, 0, 400, sts_file)
    deadline = time.time() + 300
    count = 0
    while time.time() < deadline and count < 15:
        time.sleep(0.2)
        if cache_path.exists():
            try:
                db = sqlite3.connect(cache_path, timeout=5)
                count = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
                db.close()
            except sqlite3.OperationalError:
                pass  # the schema is not there yet
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert count >= 15, p.stderr.read()
    db = sqlite3.connect(cache_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    db.close()
    assert kept >= count
    monkeypatch.delenv(DELAY_VARIABLE)
    done = _distinct(sts_sentences, 0, 400)[:kept]
    with fake(fake_model, templates="prompteol", cache=cache_path) as m:
        warm, st = counted(m, done)
        assert (st.hits, st.misses) == (kept, 0)
    with fake(fake_model, templates="prompteol", cache=False) as m:
        assert np.array_equal(warm, m.encode(done))


OPENER = (
    "import sys, warnings; warnings.simplefilter('error');"
    "from metaeol_edge.cache import EmbeddingCache;"
    "c = EmbeddingCache.open(sys.argv[1]); assert c is not None; c.close()"
)


def test_processes_opening_a_new_cache_at_once_all_get_it(tmp_path):
    # A new file switched to WAL by one process used to make others see "database is locked".
    for trial in range(10):
        path = tmp_path / f"c{trial}.sqlite3"
        procs = [
            subprocess.Popen([sys.executable, "-c", OPENER, str(path)], stderr=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
