"""File helpers shared by the modules: installed data folders, atomic writes, SQLite schema migrations."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import BinaryIO

CHECKOUT = Path(__file__).resolve().parent.parent


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it, so once, at import, before any thread writes
    os.umask(umask)
    return umask


UMASK = _read_umask()


def package_data(subpackage: str, checkout_folder: str):
    """An installed data folder (a Traversable), or the source checkout's folder, or None.

    The data folders are namespace packages, so the installed one may be a
    MultiplexedPath: join names onto it, do not turn it into a string.
    """
    try:
        root = resources.files(f"metaeol_edge.{subpackage}")
        if root.is_dir():
            return root
    except ModuleNotFoundError:
        pass
    here = CHECKOUT / checkout_folder
    return here if here.is_dir() else None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    For writers that open a file by name (llama.cpp's quantizer, the gguf package).
    A crash or an exception leaves ``path`` as it was and no file that looks valid.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # as open() would have made it; mkstemp makes it private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file beside ``path``; it becomes ``path`` (flushed to disk) only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def apply_migrations(db, version: int, migrations: Sequence[Callable], application_id: int) -> None:
    """Bring an SQLite file (``db``, in autocommit mode) from schema ``version`` to ``len(migrations)``.

    All or nothing, under SQLite's write lock; the version is read again under it, since another
    process may have migrated while this one waited. Stamps ``application_id``, which tells the
    file from a foreign SQLite database.
    """
    if version == len(migrations):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for migrate in migrations[version:]:
            migrate(db)
        db.execute(f"PRAGMA application_id = {application_id}")
        db.execute(f"PRAGMA user_version = {len(migrations)}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
