"""Corpus-scale jobs: table input and output, several engine processes, resuming after kill -9,
Ray, and merging caches. Every vector is checked against ``MetaEOL.encode`` bit for bit.

Bulk's logic is the subject, not the engine's numbers: the jobs run the fake backend (conftest
``fake_model``, ``--backend fake``), and one end-to-end test (several processes) runs smollm2-135m."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE, fake
from metaeol_edge.backends_fake import DELAY_VARIABLE
from metaeol_edge.bulk import auto_workers, embed_file, shards_dir
from metaeol_edge.cache import MergeConflictError, merge_caches
from metaeol_edge.cli import main
from metaeol_edge.corpus import read_vectors
from metaeol_edge.presets import get_preset

from metaeol_edge import MetaEOL

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# Commas, quotes, a line break inside a field, non-ASCII: what a CSV writer must quote.
TEXTS = [
    "A man is playing a guitar.",
    'She said, "hello, world".',
    "Two lines\nin one field.",
    "Le café est fermé le dimanche.",
    "The stock market fell sharply today.",
    "A chef is slicing vegetables.",
    "Someone is making music on a string instrument.",
]
LINES = [t for t in TEXTS if "\n" not in t]  # what a plain text file can hold


@pytest.fixture(scope="module")
def expected(fake_model):
    with fake(fake_model, "prompteol", cache=False) as m:
        return m.encode(TEXTS)


def _write_table(tmp: Path, kind: str) -> Path:
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    if kind == "csv":
        path = tmp / "in.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["doc", "body", "other"])
            w.writerows([i, t, "x"] for i, t in zip(ids, TEXTS, strict=True))
    elif kind == "jsonl":
        path = tmp / "in.jsonl"
        path.write_text("".join(json.dumps({"doc": i, "body": t}) + "\n" for i, t in zip(ids, TEXTS, strict=True)))
    else:
        path = tmp / "in.parquet"
        table = pa.table({"doc": ids, "body": TEXTS, "n": list(range(len(TEXTS)))})
        pq.write_table(table, path, row_group_size=3)  # several row groups: read as a stream
    return path


def _ids(path: Path) -> list:
    if path.suffix == ".jsonl":
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]
    return pq.read_table(path).column("id").to_pylist()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("out", ["jsonl", "parquet"])
def test_tables_in_and_out_keep_ids_and_vectors(kind, out, tmp_path, expected, fake_model):
    src = _write_table(tmp_path, kind)
    dst = tmp_path / f"out.{out}"
    argv = ["embed", *FAKE, "-q", "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    argv += ["-o", str(dst)]
    assert main([*argv, "--text-column", "body", "--id-column", "doc", "--workers", "1"]) == 0
    assert _ids(dst) == [f"doc-{i}" for i in range(len(TEXTS))]
    got = read_vectors(dst)
    if out == "jsonl":  # JSON keeps float32 values exactly (shortest repr round-trips)
        assert np.array_equal(got, expected)
    else:
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert pq.read_schema(dst).field("embedding").type == pa.list_(pa.float32(), expected.shape[1])
    assert not shards_dir(dst).exists()


def test_parquet_output_of_several_layers_and_templates(tmp_path, fake_model):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES[3:]) + "\n")
    dst = tmp_path / "out.parquet"
    argv = ["embed", *FAKE, "-q", "--no-cache", "-m", str(fake_model), "-i", str(src), "-o", str(dst)]
    argv += ["--per-template"]
    assert main([*argv, "--layer", "10,-1", "--workers", "1"]) == 0
    with fake(fake_model, cache=False, layer=[10, -1]) as m:
        want = m.encode(LINES[3:], per_template=True)
    got = read_vectors(dst)  # (rows, layers, templates, dim)
    assert got.shape == (3, 2, 8, 576)
    assert np.array_equal(got, np.stack(want, axis=1))


def test_bad_tables_are_clear_errors(tmp_path, capsys, fake_model):
    src = _write_table(tmp_path, "csv")
    base = ["embed", *FAKE, "-q", "-t", "prompteol", "-m", str(fake_model), "-i", str(src)]
    cases = [
        ([*base, "-o", str(tmp_path / "o.npy")], "has no column 'text' (the text column, --text-column); its columns"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--text-column", "body", "--id-column", "doc"], "holds vectors only"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--text-column", "body", "--workers", "0"], "--workers takes"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--text-column", "body", "--workers", "x"], "--workers takes"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--text-column", "body", "--shard-size", "0"], "shard size must"),
    ]
    bad_type = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), bad_type)
    cases.append(
        (["embed", "-q", "-i", str(bad_type), "-o", str(tmp_path / "o.npy")], "column 'text' holds int64, not strings")
    )
    nulls = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    cases.append((["embed", "-q", "-i", str(nulls), "-o", str(tmp_path / "o.npy")], "row 2: null 'text'"))
    blank = tmp_path / "blank.csv"
    blank.write_text("text\nfine\n  \n")
    cases.append((["embed", "-q", "-i", str(blank), "-o", str(tmp_path / "o.npy")], "line 3: empty or whitespace"))
    not_parquet = tmp_path / "junk.parquet"
    not_parquet.write_text("not parquet")
    cases.append((["embed", "-q", "-i", str(not_parquet), "-o", str(tmp_path / "o.npy")], "not a readable Parquet"))
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / "o.npy").exists() and not shards_dir(tmp_path / "o.npy").exists()


@pytest.mark.slow
def test_several_processes_give_the_bytes_of_one(tmp_path, smollm2):
    """PromptEOL through two processes, small shards: equal to one encode call bit for bit.

    The bulk face's end-to-end test on the real engine (two threads per process, as in the check). PromptEOL,
    one prompt a sentence: how the work is split is the subject, not the template set."""
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    opts = dict(model=str(smollm2), templates="prompteol", cache=False)
    report = embed_file(src, tmp_path / "two.npy", opts, workers=2, threads=2, shard_size=2, show_progress=False)
    assert len(report.workers) == 2 and all(rss > 50 for rss in report.workers.values())  # two processes, MB
    with MetaEOL(smollm2, "prompteol", cache=False, n_threads=2) as m:
        want = m.encode(LINES)
    assert np.array_equal(np.load(tmp_path / "two.npy"), want)


def test_messages_name_the_input_row_not_the_shard_row(tmp_path, fake_model, capsys):
    """Errors and warnings from a worker's shard number rows as the input does."""
    lines = list(LINES)
    lines[4] = " ".join(["word"] * 120)  # row 5: cut to fit --max-length 64
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    base = ["embed", *FAKE, "-q", "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    base += ["--shard-size", "2"]
    assert main([*base, "-o", str(tmp_path / "o.npy"), "--workers", "2", "--max-length", "64"]) == 0
    err = capsys.readouterr().err
    assert "sentence #5 was truncated from " in err, err
    lines[3] = "bad\x00byte"  # row 4
    src.write_text("\n".join(lines) + "\n")
    assert main([*base, "-o", str(tmp_path / "p.npy"), "--workers", "2"]) == 2
    assert "sentence #4 contains a NUL character" in capsys.readouterr().err


def _sentences(n: int) -> list[str]:
    subjects = ["A man", "A woman", "The child", "An old dog", "Two birds", "The committee", "A robot"]
    verbs = ["is reading", "paints", "watches", "is repairing", "describes", "sells", "builds"]
    objects = ["a book.", "the fence.", "a small boat.", "the news.", "an old map.", "a cake.", "the bridge."]
    return [f"{subjects[i % 7]} {verbs[(i // 7) % 7]} {objects[(i // 49 + i) % 7]} ({i})" for i in range(n)]


def _children(pid: int) -> list[int]:
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_a_killed_job_resumes_to_the_same_bytes(tmp_path, fake_model, monkeypatch):
    """kill -9 of `metaeol embed --workers 2` (cache off) partway; the same command again finishes the job,
    and its output equals an uninterrupted run's byte for byte."""
    src = tmp_path / "in.txt"
    src.write_text("\n".join(_sentences(60)) + "\n")
    common = ["embed", *FAKE, "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    common += ["--shard-size", "4"]
    # The fake takes 0.1 s a sentence in the job's processes (as smollm2 roughly does): a kill lands mid-job.
    monkeypatch.setenv(DELAY_VARIABLE, "0.1")
    out = tmp_path / "out.npy"
    cmd = [sys.executable, "-m", "metaeol_edge", *common, "-o", str(out), "--workers", "2"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    folder = shards_dir(out)
    deadline = time.monotonic() + 240
    while len(list(folder.glob("*.npy"))) < 3:  # some shards done, most not
        assert job.poll() is None, job.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    workers = _children(job.pid)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done_before = len(list(folder.glob("*.npy")))
    assert not out.exists() and done_before < 15
    deadline = time.monotonic() + 30  # orphaned workers notice and exit
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "the workers outlived their parent"
        time.sleep(0.2)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "rows from an earlier run" in resumed.stderr
    assert not folder.exists()
    monkeypatch.delenv(DELAY_VARIABLE)  # the uninterrupted run needs no delay: it changes no vector
    whole = tmp_path / "whole.npy"
    assert main([*common, "-q", "-o", str(whole), "--workers", "1"]) == 0
    assert out.read_bytes() == whole.read_bytes()


def test_a_changed_job_starts_over(tmp_path, fake_model, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out.npy"
    folder = shards_dir(out)
    folder.mkdir()
    (folder / "job.json").write_text('{"another": "job"}')
    np.save(folder / "00000000.npy", np.zeros((1, 4, 576), np.float32))  # vectors of another setting
    argv = ["embed", *FAKE, "-q", "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    argv += ["-o", str(out)]
    assert main([*argv, "--shard-size", "4"]) == 0
    assert "starting over" in capsys.readouterr().err
    with fake(fake_model, "prompteol", cache=False) as m:
        assert np.array_equal(np.load(out), m.encode(LINES))


def test_a_folder_that_is_not_a_jobs_is_never_deleted(tmp_path, fake_model, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out.npy"
    mine = shards_dir(out)
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    argv = ["embed", *FAKE, "-q", "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    assert main([*argv, "-o", str(out)]) == 2
    assert "is not an unfinished job's folder" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "the user's own file" and not out.exists()


def test_auto_workers_follow_the_measurement():
    assert auto_workers(100_000_000, cores=2) == 2  # smollm2-135m (98 MB)
    assert auto_workers(1_100_000_000, cores=2) == 1  # qwen2.5-coder-1.5b
    assert auto_workers(100_000_000, cores=1) == 1


# -- caches from several machines ----------------------------------------------------------


def _fill(path: Path, model: Path, sentences: list[str]) -> None:
    with fake(model, "prompteol", cache=path) as m:
        m.encode(sentences)


def _entries(path: Path) -> dict[bytes, bytes]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT key, vector FROM embeddings"))


def _dump(path: Path) -> list[str]:
    """Every table's rows as SQL (the file's bytes may move with SQLite's checkpoints; its content may not)."""
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def test_cache_merge_is_a_union_and_refuses_conflicts(tmp_path, fake_model, capsys):
    # The merge's subject is the cache files: the fake backend's vectors do.
    a, b, c = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "c.sqlite"
    _fill(a, fake_model, TEXTS[:4])
    _fill(b, fake_model, TEXTS[2:])  # two sentences in common: same key, same bytes
    want = _entries(a) | _entries(b)
    assert len(want) == len(TEXTS)
    assert main(["cache", "merge", str(b), "--into", str(a)]) == 0
    assert "3 added, 2 already present" in capsys.readouterr().out
    assert _entries(a) == want
    with fake(fake_model, "prompteol", cache=a) as m:  # the merged cache serves every sentence
        stats = __import__("metaeol_edge").EncodeStats()
        m.encode(TEXTS, stats=stats)
        assert (stats.hits, stats.misses) == (len(TEXTS), 0)

    _fill(c, fake_model, TEXTS[:2])
    with sqlite3.connect(c) as db:  # one entry's bytes differ (with a valid checksum: a real conflict)
        from metaeol_edge.cache import checksum

        key, vector = db.execute("SELECT key, vector FROM embeddings LIMIT 1").fetchone()
        bad = bytes([vector[0] ^ 1]) + vector[1:]
        db.execute("UPDATE embeddings SET vector = ?, checksum = ? WHERE key = ?", (bad, checksum(key, bad), key))
    before = _dump(a)
    d = tmp_path / "d.sqlite"
    _fill(d, fake_model, ["A sentence only d has."])
    assert main(["cache", "merge", str(d), str(c), "--into", str(a)]) == 2
    err = capsys.readouterr().err
    assert "1 entries of" in err and "different vector bytes" in err and "nothing was merged" in err
    assert _dump(a) == before and _entries(a) == want  # d's entry was not added either
    with pytest.raises(MergeConflictError):
        merge_caches(a, [c])


def test_cache_merge_bad_sources(tmp_path, capsys):
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    target = tmp_path / "t.sqlite"
    for argv, message in [
        (["cache", "merge", str(tmp_path / "absent.sqlite"), "--into", str(target)], "is not a file"),
        (["cache", "merge", str(foreign), "--into", str(target)], "is not a metaeol-edge cache"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


# -- Ray -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_embed_dataset_and_cli(local_ray, tmp_path, fake_model):
    from metaeol_edge.bulk import embed_dataset

    sentences = _sentences(30)
    ds = local_ray.data.from_items([{"id": i, "text": s, "extra": i * 2} for i, s in enumerate(sentences)])
    out = embed_dataset(
        ds, fake_model, "prompteol", concurrency=2, num_cpus=1, batch_size=8, cache=False, backend="fake"
    )
    rows = out.take_all()
    assert {"id", "text", "extra", "embedding"} <= set(rows[0])  # every column kept
    got = {r["id"]: np.asarray(r["embedding"], dtype=np.float32) for r in rows}
    assert all(r["extra"] == 2 * r["id"] for r in rows)
    with fake(fake_model, "prompteol", cache=False) as m:
        want = m.encode(sentences)
    assert np.array_equal(np.stack([got[i] for i in range(len(sentences))]), want)

    src = tmp_path / "in.txt"
    src.write_text("\n".join(sentences) + "\n")
    dst = tmp_path / "out.npy"
    argv = ["embed", *FAKE, "-q", "-t", "prompteol", "--no-cache", "-m", str(fake_model), "-i", str(src)]
    argv += ["-o", str(dst), "--ray", "auto", "--workers", "2", "--shard-size", "8"]
    assert main(argv) == 0  # joins the running Ray
    assert np.array_equal(np.load(dst), want)



@pytest.mark.slow
def test_embed_from_a_program_without_a_file_stays_in_process(tmp_path, smollm2):
    """`python - < job.py` (or a notebook): no file for a spawned worker to re-run. auto falls back to this
    process and says so; an explicit --workers N is an error that says why, before any work."""
    src = tmp_path / "in.txt"
    src.write_text("a man plays guitar\na dog runs\nthe sky is blue\n", encoding="utf-8")
    job = (
        "import sys\nfrom metaeol_edge.cli import main\n"
        f"sys.exit(main(['embed', '-i', {str(src)!r}, '-o', {str(tmp_path / 'out.npy')!r}, '-m', {str(smollm2)!r}, "
        "'--workers', sys.argv[1], '--shard-size', '1', '-t', 'prompteol', '--no-cache', '-q']))\n"
    )
    run = [sys.executable, "-", "auto"]
    auto = subprocess.run(run, input=job, capture_output=True, text=True, timeout=300)
    assert auto.returncode == 0, auto.stderr
    assert "embedding in this process, not" in auto.stderr and "'<stdin>' does not exist" in auto.stderr
    assert np.load(tmp_path / "out.npy").shape == (3, 576)
    (tmp_path / "out.npy").unlink()
    two = subprocess.run([sys.executable, "-", "2"], input=job, capture_output=True, text=True, timeout=300)
    assert two.returncode != 0 and "--workers 2 needs worker processes, which cannot start here" in two.stderr
    assert "Traceback" not in two.stderr and not (tmp_path / "out.npy").exists()


def test_spawn_blocker_names_the_reason():
    from types import SimpleNamespace

    from metaeol_edge.bulk import spawn_blocker

    assert spawn_blocker(SimpleNamespace(__file__=__file__)) is None
    assert "no file" in spawn_blocker(SimpleNamespace())
    assert "does not exist" in spawn_blocker(SimpleNamespace(__file__="<stdin>"))


def test_a_jobs_identity_names_the_presets_revision(tmp_path, fake_model):
    """A later revision of a preset is another job, though the options say `quality` both times; a job with no
    preset keeps the identity it had (no key), so its resume is untouched."""
    from metaeol_edge.faces.bulk import EncodeOptions, Source, job_identity

    src = tmp_path / "in.txt"
    src.write_text("a\n")
    ids = {}
    for name in ("quality@1", "quality", None):
        options = {"preset": name} if name else {"templates": "prompteol"}
        with fake(fake_model, level="shipped", cache=False, **options) as m:
            ids[name] = job_identity(Source(src), 1, 4, m, m.resolved_config, EncodeOptions())
    assert ids["quality@1"]["preset"] == "quality@1" and ids["quality"]["preset"] == get_preset("quality").pinned
    assert ids["quality@1"] != ids["quality"] and "preset" not in ids[None]
