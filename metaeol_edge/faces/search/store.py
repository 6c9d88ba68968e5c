"""A collection's SQLite file: its configuration, its roots, its files and their chunks with vectors.

The schema has explicit, numbered migrations (as :mod:`metaeol_edge.cache`):
``user_version`` says which have run, ``application_id`` says the file is a
collection. A file and all its chunks are written in one transaction, and the
writer commits a batch of files at a time: a process killed at any point leaves
each file either as it was or fully replaced, so the collection stays usable and
the next ``index`` finishes the work. ``generation`` counts committed changes, so
a reader (a server) knows when the chunks it holds are stale.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaeol_edge.errors import InputError
from metaeol_edge.files import apply_migrations

APPLICATION_ID = 0x4D45434C  # "MECL": a metaeol-edge collection
BUSY_TIMEOUT_MS = 60_000


def _migration_1(db: sqlite3.Connection) -> None:
    for statement in (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE roots (path TEXT PRIMARY KEY, settings TEXT NOT NULL)",
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            root TEXT NOT NULL,
            kind TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL
        )""",
        # AUTOINCREMENT: an id is never reused, so a reader's "ids above the last I hold" are the new ones.
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            file_id INTEGER NOT NULL REFERENCES files(id),
            seq INTEGER NOT NULL,
            line INTEGER NOT NULL,
            line_end INTEGER NOT NULL,
            row_id TEXT,
            hash BLOB NOT NULL,
            text TEXT NOT NULL,
            vector BLOB NOT NULL
        )""",
        "CREATE INDEX chunks_file ON chunks(file_id, seq)",
        "CREATE INDEX chunks_hash ON chunks(hash)",
        "CREATE INDEX files_root ON files(root)",
    ):
        db.execute(statement)


MIGRATIONS = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class StoredFile:
    id: int
    path: str
    root: str
    kind: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class NewChunk:
    seq: int
    line: int
    line_end: int
    row_id: str | None
    hash: bytes
    text: str
    vector: np.ndarray


@dataclass(frozen=True)
class NewFile:
    path: str
    root: str
    kind: str
    size: int
    mtime_ns: int
    sha256: str
    chunks: Sequence[NewChunk]


@dataclass(frozen=True)
class ChunkRow:
    id: int
    path: str
    line: int
    line_end: int
    row_id: str | None
    text: str


class Store:
    """One collection file. Thread-safe: one connection, used under a lock."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"no collection at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                      check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise InputError(f"cannot open collection {self.path}: {exc}") from exc
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise InputError(f"{self.path} is not a readable collection: {exc}") from exc
        except BaseException:
            self.db.close()
            raise

    def _migrate(self) -> None:
        db = self.db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and app_id != APPLICATION_ID:
            raise InputError(f"{self.path} is an SQLite file that is not a metaeol-edge collection")
        if version > SCHEMA_VERSION:
            raise InputError(
                f"{self.path} has collection schema {version}, newer than this release's {SCHEMA_VERSION}: "
                "upgrade metaeol-edge"
            )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        apply_migrations(db, version, MIGRATIONS, APPLICATION_ID)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- transactions -----------------------------------------------------------------------------

    def _write(self, fn) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                fn(self.db)
                self.db.execute(
                    "INSERT INTO meta VALUES ('generation', '1') "
                    "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    # -- meta ----------------------------------------------------------------------------------------

    def meta(self, key: str) -> object | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def set_meta(self, values: dict[str, object]) -> None:
        def write(db: sqlite3.Connection) -> None:
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

        self._write(write)

    def generation(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE key = 'generation'")
        return int(rows[0][0]) if rows else 0

    # -- roots and files ----------------------------------------------------------------------------

    def roots(self) -> dict[str, dict]:
        return {path: json.loads(s) for path, s in self._read("SELECT path, settings FROM roots ORDER BY path")}

    def set_root(self, path: str, settings: dict) -> None:
        self._write(lambda db: db.execute("INSERT OR REPLACE INTO roots VALUES (?, ?)", (path, json.dumps(settings))))

    def files(self, root: str | None = None) -> dict[str, StoredFile]:
        sql = "SELECT id, path, root, kind, size, mtime_ns, sha256 FROM files"
        rows = self._read(sql + " WHERE root = ?", (root,)) if root is not None else self._read(sql)
        return {r[1]: StoredFile(*r) for r in rows}

    def touch(self, updates: Iterable[tuple[int, int, int]]) -> None:
        """New (size, mtime_ns) for files whose content did not change: (id, size, mtime_ns)."""
        updates = list(updates)
        if updates:
            self._write(lambda db: db.executemany("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                                                  [(s, m, i) for i, s, m in updates]))  # fmt: skip

    def put_files(self, files: Sequence[NewFile]) -> None:
        """Replace each file and all its chunks, the batch in one transaction."""

        def write(db: sqlite3.Connection) -> None:
            for f in files:
                _delete_files(db, [f.path])
                cur = db.execute(
                    "INSERT INTO files (path, root, kind, size, mtime_ns, sha256) VALUES (?, ?, ?, ?, ?, ?)",
                    (f.path, f.root, f.kind, f.size, f.mtime_ns, f.sha256),
                )
                file_id = cur.lastrowid
                db.executemany(
                    "INSERT INTO chunks (file_id, seq, line, line_end, row_id, hash, text, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            file_id,
                            c.seq,
                            c.line,
                            c.line_end,
                            c.row_id,
                            c.hash,
                            c.text,
                            np.ascontiguousarray(c.vector, dtype="<f4").tobytes(),
                        )
                        for c in f.chunks
                    ],  # fmt: skip
                )

        if files:
            self._write(write)

    def remove_files(self, paths: Sequence[str]) -> int:
        """Remove files and their chunks; the number of chunks removed."""
        removed = []
        if paths:
            self._write(lambda db: removed.append(_delete_files(db, paths)))
        return sum(removed)

    # -- chunks ----------------------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(chunks, files)."""
        rows = self._read("SELECT (SELECT count(*) FROM chunks), (SELECT count(*) FROM files)")
        return rows[0][0], rows[0][1]

    def vectors_by_hash(self, hashes: Iterable[bytes]) -> dict[bytes, np.ndarray]:
        """A stored vector for each content hash the collection already holds (a chunk seen before)."""
        hashes = list(set(hashes))
        out: dict[bytes, np.ndarray] = {}
        for start in range(0, len(hashes), 500):
            part = hashes[start : start + 500]
            marks = ",".join("?" * len(part))
            for h, blob in self._read(f"SELECT hash, vector FROM chunks WHERE hash IN ({marks})", part):
                out[h] = np.frombuffer(blob, dtype="<f4")
        return out

    def ids(self) -> np.ndarray:
        return np.array([r[0] for r in self._read("SELECT id FROM chunks ORDER BY id")], dtype=np.int64)

    def vectors(self, above: int = 0, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) of the chunks with an id over ``above``, in id order, a batch at a time."""
        last = above
        while True:
            rows = self._read("SELECT id, vector FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, batch))
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
            last = int(ids[-1])

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            found.update(self._read(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", part))
        return np.stack([np.frombuffer(found[i], dtype="<f4") for i in ids]) if ids else np.empty((0, 0), np.float32)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ChunkRow] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = ("SELECT c.id, f.path, c.line, c.line_end, c.row_id, c.text FROM chunks c "
                   f"JOIN files f ON f.id = c.file_id WHERE c.id IN ({marks})")  # fmt: skip
            out.update((r[0], ChunkRow(*r)) for r in self._read(sql, part))
        return out

    def chunks_of_file(self, path: str) -> list[ChunkRow]:
        sql = ("SELECT c.id, f.path, c.line, c.line_end, c.row_id, c.text FROM chunks c "
               "JOIN files f ON f.id = c.file_id WHERE f.path = ? ORDER BY c.seq")  # fmt: skip
        return [ChunkRow(*r) for r in self._read(sql, (path,))]


def _delete_files(db: sqlite3.Connection, paths: Sequence[str]) -> int:
    removed = 0
    for path in paths:
        row = db.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            continue
        removed += db.execute("DELETE FROM chunks WHERE file_id = ?", (row[0],)).rowcount
        db.execute("DELETE FROM files WHERE id = ?", (row[0],))
    return removed
