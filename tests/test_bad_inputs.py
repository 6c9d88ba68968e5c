"""Every bad input and fault we know of, as one table: each case gives its exit code, a message
that names the problem, and either no output file or a correct one (and an input left untouched).

The README's reliability section lists these cases.

The subject is the handling, not the engine's numbers: every ``metaeol embed`` here runs the fake
backend (``--backend fake``, conftest) over the registry's smollm2-135m file, whose header (and so its
name, depth, width and context in the messages) is read as usual; llama.cpp is never loaded. The
real engine's CLI is tested end to end in test_cli.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE, fake
from metaeol_edge.cli import main

from metaeol_edge import MetaEOL, registry
from metaeol_edge.errors import InputError, MetaEOLError, TemplateError
from metaeol_edge.models import digest

S = ["A cat sleeps.", "A kitten is napping.", "The market fell."]
LONG = " ".join(["word"] * 600)


@dataclass
class Run:
    """What a case runs: argv for ``metaeol``; ``expect`` the sentences a correct output holds."""

    argv: list[str]
    expect: list[str] | None = None
    max_length: int = 512
    untouched: list[Path] = field(default_factory=list)  # files that must be byte-identical afterwards


@dataclass
class Case:
    id: str
    make: Callable[[Path, pytest.MonkeyPatch], Run]
    rc: int
    message: str  # in stderr: the error, or for rc 0 the warning
    output: str = "none"  # none: no output file; correct: the vectors of ``expect``
    also: str = ""  # more that stderr must say (how many vectors came from the cache, say)


def _file(tmp: Path, content: bytes | str, name: str = "in.txt") -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _embed(tmp: Path, src: Path | str, *extra: str, out: str = "out.npy") -> list[str]:
    return ["embed", *FAKE, "-t", "prompteol", "-q", "-i", str(src), "-o", str(tmp / out), *extra]


def _lines(*sentences: str) -> str:
    return "".join(f"{s}\n" for s in sentences)


def _input(content: bytes | str, name: str = "in.txt", *extra: str, expect: list[str] | None = None):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        return Run(_embed(tmp, _file(tmp, content, name), *extra), expect)

    return make


def _options(*extra: str):
    return _input(_lines(*S), "in.txt", *extra, expect=S)


def _same_file(link: str):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        src = _file(tmp, "".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(S)), "data.jsonl")
        out = tmp / "out.jsonl"
        if link == "same":
            out = src
        elif link == "symlink":
            out.symlink_to(src)
        else:
            os.link(src, out)
        argv = ["embed", *FAKE, "-t", "prompteol", "-q", "-i", str(src), "-o", str(out)]
        return Run(argv, untouched=list({src, out}))

    return make


def _template(content: str, name: str = "t.json"):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        return Run(_embed(tmp, _file(tmp, _lines(*S)), "-t", str(_file(tmp, content, name))))

    return make


def _model(model: Callable[[Path], str]):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        return Run(_embed(tmp, _file(tmp, _lines(*S)), "--model", model(tmp)))

    return make


def _not_gguf(tmp: Path) -> str:
    return str(_file(tmp, "not a model", "bad.gguf"))


def _truncated_gguf(tmp: Path) -> str:
    path = tmp / "cut.gguf"
    path.write_bytes(registry.model_path("smollm2-135m").read_bytes()[:20_000_000])
    return str(path)


def _private_store(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    """A model store of its own holding a copy of smollm2 (a copy: the test damages it)."""
    source = registry.model_path("smollm2-135m")
    home = tmp / "home"
    mp.setenv("METAEOL_HOME", str(home))
    path = registry.model_path("smollm2-135m")
    path.parent.mkdir(parents=True)
    shutil.copyfile(source, path)
    assert registry.verify_model("smollm2-135m")  # checked once, as a pull does
    return path


def _damage_middle(path: Path, n: int, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = random.Random(seed).randbytes(n)
    path.write_bytes(bytes(data))


def _damaged_model(verb: str):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        path = _private_store(tmp, mp)
        _damage_middle(path, 1000)  # same size, new mtime
        if verb == "verify":
            return Run(["models", "verify", "smollm2-135m"])
        return Run(_embed(tmp, _file(tmp, _lines(*S)), "--model", "smollm2-135m"))

    return make


def _cache() -> Path:
    return Path(os.environ["METAEOL_CACHE"])


def _warm(tmp: Path, sentences: list[str], *extra: str) -> None:
    """Fill the cache with these sentences' vectors, as a first run does, in input order (one process):
    the faults below pick the last entry written, one of the sentences the run then reads."""
    warm = _file(tmp, _lines(*sentences), "warm.txt")
    assert main(_embed(tmp, warm, *extra, "--workers", "1", out="warm.npy")) == 0


def _cache_fault(fault: str, verb: str = "embed"):
    def make(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
        many = [f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain", "tea"] * 10)]
        if fault == "not sqlite":
            _cache().write_bytes(b"this is not sqlite at all" * 100)
        elif fault == "a folder":
            _cache().mkdir()
        elif fault == "foreign":
            db = sqlite3.connect(_cache())
            db.execute("CREATE TABLE photos (id INTEGER)")
            db.commit()
            db.close()
        else:
            _warm(tmp, many + S)
            if fault == "damaged in the middle":
                size = _cache().stat().st_size
                assert size > 120_000, size
                _damage_middle(_cache(), 40_000, seed=1)
            elif fault == "newer schema":
                db = sqlite3.connect(_cache())
                db.execute("PRAGMA user_version = 99")
                db.commit()
                db.close()
            elif fault == "damaged vector":
                db = sqlite3.connect(_cache())
                rowid, blob = db.execute("SELECT id, vector FROM embeddings ORDER BY id DESC LIMIT 1").fetchone()
                bad = bytearray(blob)
                bad[400:464] = np.arange(16, dtype=np.float32).tobytes()  # 16 floats overwritten in place
                db.execute("UPDATE embeddings SET vector = ? WHERE id = ?", (bytes(bad), rowid))
                db.commit()
                db.close()
            elif fault == "read-only":
                if subprocess.run(["chattr", "+i", str(_cache())], capture_output=True).returncode != 0:
                    pytest.skip("chattr +i is not allowed here")
        if verb == "stats":
            return Run(["cache", "stats"])
        if verb == "clear":
            return Run(["cache", "clear"])
        return Run(_embed(tmp, _file(tmp, _lines(*S))), S)

    return make


def _no_truncate_warm(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
    _warm(tmp, [LONG], "--max-length", "64")  # truncated, with a warning, and cached
    return Run(_embed(tmp, _file(tmp, _lines(LONG)), "--max-length", "64", "--no-truncate"))


def _truncated_warm(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
    _warm(tmp, [LONG], "--max-length", "64")
    return Run(_embed(tmp, _file(tmp, _lines(LONG)), "--max-length", "64"), [LONG], max_length=64)


def _postprocess_missing(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
    mp.setenv("METAEOL_HOME", str(tmp / "home"))
    (tmp / "home" / "models" / "smollm2-135m").mkdir(parents=True)
    (tmp / "home" / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(
        registry.model_path("smollm2-135m")
    )
    return Run(_embed(tmp, _file(tmp, _lines(*S)), "--postprocess", "--layer", "20"))


def _stale_part(tmp: Path, mp: pytest.MonkeyPatch) -> Run:
    path = _private_store(tmp, mp)
    (path.parent / f".{path.name}.abc123.part").write_bytes(b"x" * 1000)  # what a killed pull leaves
    return Run(_embed(tmp, _file(tmp, _lines(*S)), "--model", "smollm2-135m"), S)


CASES = [
    # -- the input file
    Case("empty file", _input(b""), 2, "holds no sentences"),
    Case("blank lines only", _input(b"\n \n\n"), 2, "holds no sentences"),
    Case("blank line in the middle", _input(b"one\n\nthree\n"), 2, "line 2: empty or whitespace-only"),
    Case("whitespace line in the middle", _input(b"one\n \t \nthree\n"), 2, "line 2: empty or whitespace-only"),
    Case("trailing blank lines", _input(_lines(*S) + "\n\n", expect=S), 0, "", "correct"),
    Case("BOM and CRLF", _input("\ufeff" + "\r\n".join(S) + "\r\n", expect=S), 0, "", "correct"),
    Case("invalid UTF-8", _input(b"fine\n\xff\xfe broken\n"), 2, "line 2: invalid UTF-8 (byte 0xff"),
    Case("NUL byte", _input(b"fine\nbad\x00byte\n"), 2, "sentence #2 contains a NUL character"),
    Case("missing input", lambda tmp, mp: Run(_embed(tmp, tmp / "absent.txt")), 2, "cannot read input file"),
    Case("input is a folder", lambda tmp, mp: Run(_embed(tmp, tmp)), 2, "cannot read input file"),
    Case("JSONL: bad JSON", _input('{"text": "a"}\n{oops\n', "in.jsonl"), 2, "line 2: not valid JSON"),
    Case("JSONL: no text", _input('{"text": "a"}\n{"txt": "b"}\n', "in.jsonl"), 2, "line 2: needs a string 'text'"),
    Case("JSONL: text not a string", _input('{"text": 5}\n', "in.jsonl"), 2, "line 1: needs a string 'text'"),
    Case("JSONL: an array", _input('["a"]\n', "in.jsonl"), 2, "line 1: needs a string 'text' field"),
    Case("JSONL: blank text", _input('{"text": "  "}\n', "in.jsonl"), 2, "line 1: empty or whitespace-only"),
    Case(
        "text file starting with {",
        _input('{"text": "a"}\nplain\n', expect=['{"text": "a"}', "plain"]),
        0,
        "",
        "correct",
    ),
    Case(
        "--format jsonl on a .txt",
        _input("".join(json.dumps({"text": s}) + "\n" for s in S), "in.txt", "--format", "jsonl", expect=S),
        0,
        "",
        "correct",
    ),
    Case("--format unknown", _options("--format", "xml"), 2, "invalid choice: 'xml'"),
    # -- the output
    Case("output is the input", _same_file("same"), 2, "is the input file"),
    Case("output is a symlink to the input", _same_file("symlink"), 2, "is the input file"),
    Case("output is a hard link to the input", _same_file("hard"), 2, "is the input file"),
    Case(
        "output suffix",
        lambda tmp, mp: Run(_embed(tmp, _file(tmp, _lines(*S)), out="out.csv")),
        2,
        "must end in .npy, .jsonl or .parquet",
    ),
    Case(
        "output under a file",
        lambda tmp, mp: Run(_embed(tmp, _file(tmp, _lines(*S)), out="in.txt/o.npy")),
        2,
        "cannot create the folder of output",
    ),
    Case(
        "output is a folder",
        lambda tmp, mp: (tmp / "dir.npy").mkdir() or Run(_embed(tmp, _file(tmp, _lines(*S)), out="dir.npy")),
        2,
        "is a folder",
    ),
    # -- options
    Case("batch size 0", _options("--batch-size", "0"), 2, "batch_size must be a positive integer"),
    Case("batch size -3", _options("--batch-size", "-3"), 2, "batch_size must be a positive integer"),
    Case("max length 8", _options("--max-length", "8"), 2, "max_length must be at least 16"),
    Case("max length 100000", _options("--max-length", "100000"), 2, "over smollm2-135m's training context"),
    Case("layer 99", _options("--layer", "99"), 2, "layer 99 is out of range"),
    Case("layer 0", _options("--layer", "0"), 2, "layer 0 is out of range"),
    Case("layer abc", _options("--layer", "abc"), 2, "layer must be an integer, a fraction"),
    Case("layer 1.5", _options("--layer", "1.5"), 2, "a fractional layer must lie in (0, 1]"),
    Case("cache cap 0", _options("--cache-max-mb", "0"), 2, "--cache-max-mb must be a positive size"),
    Case("cache cap -1", _options("--cache-max-mb", "-1"), 2, "--cache-max-mb must be a positive size"),
    Case("unknown template set", _options("-t", "nonesuch"), 2, "no template set named or at 'nonesuch'"),
    Case("template without placeholder", _template("no placeholder\n", "t.txt"), 2, "exactly once, found 0"),
    Case("template with two placeholders", _template("*sent 0* and *sent 0*\n", "t.txt"), 2, "found 2 times"),
    Case("template file not JSON", _template("{not json"), 2, "is not valid JSON"),
    Case("template file empty", _template("# only a comment\n", "t.txt"), 2, "holds no templates"),
    Case("unknown method", _options("--method", "nonesuch"), 2, "unknown method 'nonesuch'"),
    Case("postprocess without a fit", _postprocess_missing, 2, "no post-processing fitted"),
    Case("unknown level", _options("--level", "q9_9"), 2, "unknown quantization level 'q9_9'"),
    Case("no truncation, long sentence", _input(_lines(LONG), "in.txt", "--no-truncate"), 2, "over max_length 512"),
    # -- models
    Case("unknown model id", _model(lambda tmp: "no-such-model"), 2, "unknown model id 'no-such-model'"),
    Case("missing model file", _model(lambda tmp: str(tmp / "absent.gguf")), 2, "does not exist"),
    Case("not a GGUF file", _model(_not_gguf), 2, "not a GGUF model file"),
    Case("truncated GGUF file", _model(_truncated_gguf), 2, "truncated"),
    Case("damaged pulled model", _damaged_model("embed"), 2, "metaeol models pull smollm2-135m --force"),
    Case("models verify, damaged", _damaged_model("verify"), 1, "does not match its SHA-256"),
    Case("models rm PATH", lambda tmp, mp: Run(["models", "rm", str(tmp / "m.gguf")]), 2, "takes a registry id"),
    Case("models rm unknown id", lambda tmp, mp: Run(["models", "rm", "nonesuch"]), 2, "known ids: "),
    Case("a killed pull's .part file", _stale_part, 0, "", "correct"),
    # -- the cache
    Case("cache is not SQLite", _cache_fault("not sqlite"), 0, "moved it to", "correct"),
    Case("cache is a folder", _cache_fault("a folder"), 0, "cannot be used", "correct"),
    Case("cache is another program's SQLite", _cache_fault("foreign"), 0, "did not create", "correct"),
    Case("cache from a newer release", _cache_fault("newer schema"), 0, "newer than this release", "correct"),
    Case("cache damaged in the middle", _cache_fault("damaged in the middle"), 0, "embedding cache", "correct"),
    Case("cache damaged, stats", _cache_fault("damaged in the middle", "stats"), 0, "damaged"),
    Case("cache damaged, clear", _cache_fault("damaged in the middle", "clear"), 0, "damaged"),
    Case(
        "damaged vector in the cache",
        _cache_fault("damaged vector"),
        0,
        "1 cached vector(s) failed their checksum",
        "correct",
        also="2 cached and 1 computed",  # the damaged one is never a hit
    ),
    Case(
        "read-only cache file",
        _cache_fault("read-only"),
        0,
        "cannot be written",
        "correct",
        also="3 cached and 0 computed",  # its vectors are still served
    ),
    Case("--no-truncate on a cached long sentence", _no_truncate_warm, 2, "over max_length 64"),
    Case("truncation warned on a warm run", _truncated_warm, 0, "was truncated from", "correct"),
]


@pytest.fixture
def unfreeze():
    yield
    subprocess.run(["chattr", "-i", os.environ["METAEOL_CACHE"]], capture_output=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_or_fault(case: Case, tmp_path, monkeypatch, capsys, smollm2, unfreeze):
    run = case.make(tmp_path, monkeypatch)
    before = {p: p.read_bytes() for p in run.untouched}
    planted = set(tmp_path.rglob("*.part"))  # a case's own stale file (the killed pull's) is not the run's
    capsys.readouterr()
    try:
        rc = main(run.argv)
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == case.rc, err
    assert case.message in err and case.also in err, err
    assert "Traceback" not in err
    if rc != 0:
        assert err.startswith(("error: ", "usage:")) or "\nerror: " in err or case.rc == 1, err
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was changed"
    out = Path(run.argv[run.argv.index("-o") + 1]) if "-o" in run.argv else None
    if case.output == "none":
        assert out is None or not out.exists() or out in before or out.is_dir(), f"{out} was written"
    else:
        with fake(smollm2, "prompteol", cache=False, max_length=run.max_length) as m:
            expected = m.encode(run.expect)
        assert np.array_equal(np.load(out), expected)
    leftovers = [str(p.relative_to(tmp_path)) for p in set(tmp_path.rglob("*.part")) - planted]  # the store's too
    assert not leftovers, leftovers


def test_a_damaged_model_is_hashed_again_only_when_it_changed(tmp_path, monkeypatch):
    path = _private_store(tmp_path, monkeypatch)
    calls = []
    real = digest.sha256_file
    monkeypatch.setattr(digest, "sha256_file", lambda p: calls.append(p) or real(p))
    registry.resolve_model("smollm2-135m")
    assert calls == []  # size and mtime as recorded: no hashing on a normal start
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    registry.resolve_model("smollm2-135m")
    assert calls == [path]  # touched, same bytes: hashed once, accepted, recorded again
    registry.resolve_model("smollm2-135m")
    assert calls == [path]


_PULL = """
import hashlib, json, sys
from metaeol_edge import registry
data = json.loads(sys.argv[1])
spec = registry.ModelSpec(**data)
registry.get_spec = lambda model_id, paths_allowed=True: spec
registry.pull_model("tiny")
"""


def test_a_killed_pulls_part_file_is_removed_by_the_next_pull(tmp_path, monkeypatch):
    """A real pull, from a local server that stalls half way, killed with SIGKILL: its .part file is
    found where it is (inside the store's folders), and the next pull removes it and succeeds."""
    import hashlib
    import http.server
    import sys
    import threading
    import time

    payload = b"GGUF" + bytes(range(256)) * 12288  # 3 MB: the pull writes its first 1 MiB read, then waits
    stall = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if stall.is_set():
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                time.sleep(30)  # the pull waits for the rest until it is killed
                return
            self.wfile.write(payload)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    home = tmp_path / "home"
    monkeypatch.setenv("METAEOL_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    spec = dict(
        id="tiny", name="tiny", architecture="llama", file="tiny.gguf", size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(), license="test",
        sources=[{"type": "huggingface", "repo": "org/tiny", "file": "tiny.gguf"}],
    )  # fmt: skip
    try:
        stall.set()
        proc = subprocess.Popen([sys.executable, "-c", _PULL, json.dumps(spec)], env=dict(os.environ))
        try:
            deadline = time.time() + 60
            parts: list[Path] = []
            while time.time() < deadline and not any(p.stat().st_size > 0 for p in parts):
                time.sleep(0.05)
                parts = list(home.rglob("*.part"))
            assert parts and parts[0].stat().st_size > 0, "the pull never started writing"
        finally:
            proc.kill()
            proc.wait(10)
        assert list(home.rglob("*.part")) == parts  # what the killed pull left, inside the store's folders
        stall.clear()
        monkeypatch.setattr(registry, "get_spec", lambda model_id, paths_allowed=True: registry.ModelSpec(**spec))
        path = registry.pull_model("tiny")
        assert path.read_bytes() == payload
        assert list(home.rglob("*.part")) == []
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.encode(b"A cat."), InputError, "not bytes"),
        (lambda m: m.encode([b"A cat."]), InputError, "sentence #1 is bytes"),
        (lambda m: m.encode(["A cat.", 3]), InputError, "sentence #2 is an integer, not a string"),
        (lambda m: m.encode([None]), InputError, "sentence #1 is a NoneType"),
        (lambda m: m.encode(""), InputError, "sentence #1 is empty or whitespace only"),
        (lambda m: m.encode(["ok", "   "]), InputError, "sentence #2 is empty"),
        (lambda m: m.encode(["a\x00b"]), InputError, "NUL"),
        (lambda m: m.encode(["a"], batch_size=True), ValueError, "batch_size"),
        (lambda m: list(m.encode_iter("one string")), InputError, "not a single string"),
        (lambda m: MetaEOL("smollm2-135m", max_length=10), ValueError, "at least 16"),
        (lambda m: MetaEOL("smollm2-135m", max_length=10**6), ValueError, "training context"),
        (lambda m: MetaEOL("smollm2-135m", layer=[]), ValueError, "layer list is empty"),
        (lambda m: MetaEOL("smollm2-135m", templates="nonesuch"), TemplateError, "no template set"),
        (lambda m: MetaEOL("smollm2-135m", method="nonesuch"), MetaEOLError, "unknown method"),
        (lambda m: MetaEOL("smollm2-135m", backend="nonesuch"), ValueError, "unknown backend"),
        (lambda m: MetaEOL("smollm2-135m", cache_max_bytes=0), ValueError, "must be positive"),
        (lambda m: MetaEOL("smollm2-135m", cache_dtype="int8"), ValueError, "cache_dtype"),
    ],
)
def test_bad_python_calls_are_clear_errors(call, error, message, smollm2):
    # The default backend's constructor refusals above come before any load; the encode refusals are the
    # embedder's, the same over any backend.
    with fake(smollm2, "prompteol", cache=False) as m, pytest.raises(error, match=message):
        call(m)


def test_a_write_error_names_the_output_not_its_temporary_file(tmp_path):
    """A full disk, played by a file-size limit: one line naming the output, no file left that looks valid."""
    import resource
    import signal
    import sys

    src = _file(tmp_path, _lines(*S))
    out = tmp_path / "out.npy"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # 3 vectors of 576 floats need 6.9 KB

    cmd = [sys.executable, "-m", "metaeol_edge", *_embed(tmp_path, src, "--no-cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert f"error: cannot write output {out}: File too large" in r.stderr and ".part" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
