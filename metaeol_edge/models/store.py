"""The model store: where pulled and derived files live, and the stamps that say a file was checked."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

from metaeol_edge.files import atomic_write
from metaeol_edge.models import digest

Progress = Callable[[int, int | None, str], None]
"""Called as progress(bytes_done, bytes_total_or_None, label)."""


def home() -> Path:
    env = os.environ.get("METAEOL_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("metaeol-edge"))


def store_dir() -> Path:
    return home() / "models"


def derived_path(source: Path, fingerprint: str, tag: str) -> Path:
    """Where the store keeps a file made from a model (another quantization level, a truncated copy)."""
    return store_dir() / "derived" / digest.derived_name(source, fingerprint, tag)


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
