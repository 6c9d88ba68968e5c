"""A persistent SQLite cache of per-template embeddings.

One row per (model, template, layer, pre-processing, dtype, max length, sentence):
any run computes only the pairs it has never seen. SQLite runs in WAL mode with
a busy timeout, so several processes can write at once, and every batch is
committed as it finishes, so a killed process loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs

APPLICATION_ID = 0x4D454F4C  # "MEOL": tells our database from a foreign SQLite file
BUSY_TIMEOUT_MS = 60_000
PAGE_SIZE = 65536
ENTRY_OVERHEAD = 48  # bytes of key and row bookkeeping per entry, for the size cap
DTYPES = {"float32": np.float32, "float16": np.float16}


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits first, and a migration must stay inside
    # the caller's transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migration_1(db: sqlite3.Connection) -> None:
    _run_script(
        db,
        """
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            fingerprint TEXT NOT NULL UNIQUE,
            label TEXT NOT NULL
        );
        CREATE TABLE templates (
            id INTEGER PRIMARY KEY,
            text TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL
        );
        CREATE TABLE embeddings (
            id INTEGER PRIMARY KEY,
            key BLOB NOT NULL UNIQUE,
            model_id INTEGER NOT NULL REFERENCES models(id),
            template_id INTEGER NOT NULL REFERENCES templates(id),
            dtype TEXT NOT NULL,
            last_used INTEGER NOT NULL,
            vector BLOB NOT NULL
        );
        CREATE INDEX embeddings_last_used ON embeddings(last_used);
        CREATE TABLE files (
            path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL
        );
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            model TEXT NOT NULL,
            hits INTEGER NOT NULL,
            misses INTEGER NOT NULL
        );
        """,
    )


# Explicit, ordered schema migrations: entry i takes the schema from version i to i + 1.
MIGRATIONS = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


class CacheError(Exception):
    """The cache file cannot be used: corrupt or foreign."""


class CacheTooNewError(Exception):
    """The cache file was written by a newer release: keep it, run without it."""


def default_path() -> Path:
    env = os.environ.get("METAEOL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("metaeol-edge")) / "embeddings.sqlite3"


def key_digest(parts: Iterable[str]) -> bytes:
    """SHA-256 over length-prefixed UTF-8 parts: no two different part lists join to the same bytes."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


@dataclass(frozen=True)
class CacheKey:
    model: str  # model fingerprint (SHA-256 of the file)
    template: str  # the template's exact text
    layer: int
    preprocess: bool
    dtype: str
    max_length: int
    sentence: str

    def digest(self) -> bytes:
        parts = (
            self.model,
            self.template,
            str(self.layer),
            str(int(self.preprocess)),
            self.dtype,
            str(self.max_length),
            self.sentence,
        )
        return key_digest(parts)[:16]  # 128 bits: collisions are out of reach, the index stays small


def _hour() -> int:
    return int(time.time() // 3600)


class EmbeddingCache:
    def __init__(self, path: str | Path, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            self._open_with_retry()
        except BaseException:
            self.db.close()
            raise

    def _open_with_retry(self) -> None:
        # Switching a new file to WAL needs a lock that SQLite does not wait for:
        # a process that opens the cache while another creates it sees "database
        # is locked" at once, whatever the busy timeout. Wait for it here.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._check_and_migrate()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # -- opening ---------------------------------------------------------------

    def _check_and_migrate(self) -> None:
        db = self.db
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            # One read transaction: another process may be creating the schema right
            # now, and reads taken apart could see its tables but not yet its id.
            db.execute("BEGIN")
            try:
                app_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            finally:
                db.execute("COMMIT")
        except sqlite3.OperationalError:
            raise  # cannot open or lock: not the file's fault
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path} is not a readable SQLite database: {exc}") from exc
        if tables and app_id != APPLICATION_ID:
            raise CacheError(f"{self.path} is an SQLite database that metaeol-edge did not create")
        if version > SCHEMA_VERSION:
            raise CacheTooNewError(
                f"{self.path} has cache schema {version}, newer than this release's {SCHEMA_VERSION}; "
                "upgrade metaeol-edge or use another --cache path"
            )
        if not tables:
            # Large pages hold vectors inline, about 27 float32 vectors of 576
            # dimensions a page; with 4 KiB pages each would take a page of its own.
            # Must precede WAL mode, which fixes the page size.
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @classmethod
    def open(cls, path: str | Path | None = None, max_bytes: int | None = None) -> EmbeddingCache | None:
        """Open the cache, never failing the caller's run over it.

        A corrupt or foreign file is moved aside with a warning and a fresh cache
        made; a path that cannot be written gives a warning and no cache.
        """
        path = Path(path) if path else default_path()
        if max_bytes is None and os.environ.get("METAEOL_CACHE_MAX_MB"):
            max_bytes = int(float(os.environ["METAEOL_CACHE_MAX_MB"]) * 1e6)
        try:
            return cls(path, max_bytes)
        except CacheError as exc:
            aside = path.with_name(f"{path.name}.unusable-{int(time.time())}")
            try:
                os.replace(path, aside)
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            except OSError:
                warnings.warn(f"embedding cache disabled: {exc}", stacklevel=2)
                return None
            warnings.warn(f"{exc}; moved it to {aside} and started a new cache", stacklevel=2)
            return cls.open(path, max_bytes)
        except (OSError, sqlite3.OperationalError, CacheTooNewError) as exc:
            warnings.warn(f"embedding cache at {path} cannot be used ({exc}); running without a cache", stacklevel=2)
            return None

    def close(self) -> None:
        self.db.close()

    # -- reading and writing -----------------------------------------------------

    def get_many(self, keys: Sequence[CacheKey]) -> dict[CacheKey, np.ndarray]:
        found: dict[CacheKey, np.ndarray] = {}
        by_digest = {k.digest(): k for k in keys}
        digests = list(by_digest)
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT key, dtype, vector FROM embeddings WHERE key IN ({marks})", chunk
            ).fetchall()
            for digest, dtype, blob in rows:
                found[by_digest[digest]] = np.frombuffer(blob, dtype=DTYPES[dtype]).astype(np.float32)
        return found

    def touch(self, keys: Iterable[CacheKey]) -> None:
        """Mark entries as used this hour, for least-recently-used eviction.

        Hours, not seconds: a rerun within the hour then rewrites nothing.
        """
        now = _hour()
        self._write(
            lambda db: db.executemany(
                "UPDATE embeddings SET last_used = ? WHERE key = ? AND last_used < ?",
                [(now, k.digest(), now) for k in keys],
            )
        )

    def put_many(self, items: Sequence[tuple[CacheKey, str, str, np.ndarray]]) -> None:
        """Store (key, model label, template task, vector) items in one transaction."""
        if not items:
            return
        now = _hour()

        def write(db: sqlite3.Connection) -> None:
            model_ids: dict[str, int] = {}
            template_ids: dict[str, int] = {}
            rows = []
            for key, label, task, vector in items:
                if key.model not in model_ids:
                    db.execute("INSERT OR IGNORE INTO models(fingerprint, label) VALUES (?, ?)", (key.model, label))
                    model_ids[key.model] = db.execute(
                        "SELECT id FROM models WHERE fingerprint = ?", (key.model,)
                    ).fetchone()[0]
                if key.template not in template_ids:
                    db.execute("INSERT OR IGNORE INTO templates(text, task) VALUES (?, ?)", (key.template, task))
                    template_ids[key.template] = db.execute(
                        "SELECT id FROM templates WHERE text = ?", (key.template,)
                    ).fetchone()[0]
                blob = np.ascontiguousarray(vector, dtype=DTYPES[key.dtype]).tobytes()
                rows.append((key.digest(), model_ids[key.model], template_ids[key.template], key.dtype, now, blob))
            # Rows go in rowid order, so pages fill completely (random keys as the
            # primary key left pages a third empty). A pair another process stored
            # meanwhile holds the same vector: vectors are deterministic.
            db.executemany(
                "INSERT OR IGNORE INTO embeddings(key, model_id, template_id, dtype, last_used, vector)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if self.max_bytes is not None:
                self._evict(db)

        self._write(write)

    def _evict(self, db: sqlite3.Connection) -> None:
        count, payload = db.execute("SELECT count(*), coalesce(sum(length(vector)), 0) FROM embeddings").fetchone()
        total = payload + count * ENTRY_OVERHEAD
        if not count or total <= self.max_bytes:
            return
        per_entry = total / count
        excess = math.ceil((total - self.max_bytes) / per_entry)
        db.execute(
            "DELETE FROM embeddings WHERE id IN (SELECT id FROM embeddings ORDER BY last_used LIMIT ?)",
            (excess,),
        )

    def _write(self, fn) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def record_run(self, model_label: str, hits: int, misses: int) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO runs(at, model, hits, misses) VALUES (?, ?, ?, ?)",
                (time.time(), model_label, hits, misses),
            )
        )

    # -- model fingerprints ------------------------------------------------------

    def file_sha256(self, path: Path, compute) -> str:
        """SHA-256 of a model file, computed once per (path, size, mtime)."""
        st = path.stat()
        key = str(path.resolve())
        row = self.db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (key,)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        digest = compute(path)
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (key, st.st_size, st.st_mtime_ns, digest)
            )
        )
        return digest

    # -- maintenance ---------------------------------------------------------------

    def stats(self, last_runs: int = 10) -> dict:
        db = self.db
        groups = db.execute(
            """SELECT m.label, m.fingerprint, t.task, substr(t.text, 1, 60), count(*), sum(length(e.vector))
               FROM embeddings e JOIN models m ON m.id = e.model_id JOIN templates t ON t.id = e.template_id
               GROUP BY e.model_id, e.template_id ORDER BY m.label, t.task"""
        ).fetchall()
        runs = db.execute("SELECT at, model, hits, misses FROM runs ORDER BY id DESC LIMIT ?", (last_runs,)).fetchall()
        entries = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        on_disk = sum(p.stat().st_size for p in self._files() if p.exists())
        hits = sum(r[2] for r in runs)
        lookups = sum(r[2] + r[3] for r in runs)
        return {
            "path": str(self.path),
            "entries": entries,
            "bytes_on_disk": on_disk,
            "bytes_per_entry": on_disk / entries if entries else None,
            "groups": [
                {
                    "model": g[0],
                    "fingerprint": g[1][:12],
                    "task": g[2],
                    "template": g[3],
                    "entries": g[4],
                    "vector_bytes": g[5],
                }
                for g in groups
            ],
            "runs": [{"at": r[0], "model": r[1], "hits": r[2], "misses": r[3]} for r in runs],
            "hit_rate": hits / lookups if lookups else None,
        }

    def clear(self, model: str | None = None, template: str | None = None) -> int:
        """Delete entries of a model (label or fingerprint prefix) and/or a template (task or text)."""
        where, args = [], []
        if model:
            where.append("model_id IN (SELECT id FROM models WHERE label = ? OR fingerprint LIKE ?)")
            args += [model, f"{model}%"]
        if template:
            where.append("template_id IN (SELECT id FROM templates WHERE task = ? OR text = ?)")
            args += [template, template]
        sql = "DELETE FROM embeddings" + (" WHERE " + " AND ".join(where) if where else "")
        deleted = 0

        def run(db: sqlite3.Connection) -> None:
            nonlocal deleted
            deleted = db.execute(sql, args).rowcount
            if not where:
                db.execute("DELETE FROM runs")

        self._write(run)
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if not where:
            self.db.execute("VACUUM")
        return deleted

    def _files(self) -> list[Path]:
        return [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")]
