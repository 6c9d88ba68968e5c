"""A persistent SQLite cache of per-prompt embeddings.

One row per :class:`~metaeol_edge.identity.CacheKey` (model, method, prompt,
layer, pre-processing, dtype, max length, sentence): any run computes only the
pairs it has never seen. SQLite runs in WAL mode with a busy timeout, so several
processes can write at once, and every batch is committed as it finishes, so a
killed process loses at most the batch in flight. Each thread gets its own
connection (a connection must not be shared between threads), so one cache
object serves a thread pool.

The cache never fails a run and never hands out a wrong vector:

* each vector is stored with a CRC-32 of its key and bytes; a stored vector
  that fails it is a miss, recomputed, replaced and reported;
* an SQLite file damaged anywhere (``DatabaseError`` at open or at any later
  statement) is moved aside with a warning and a new cache started, and the
  statement retried there, so the run's results are kept;
* a file that cannot be written (read-only, immutable) still serves its vectors,
  with one warning that nothing new is stored.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import platformdirs

from metaeol_edge.core.identity import CacheKey, key_digest
from metaeol_edge.errors import InputError
from metaeol_edge.files import apply_migrations

__all__ = [
    "CacheKey",
    "EmbeddingCache",
    "CacheError",
    "CacheTooNewError",
    "MergeConflictError",
    "default_path",
    "key_digest",
    "merge_caches",
]

APPLICATION_ID = 0x4D454F4C  # "MEOL": tells our database from a foreign SQLite file
BUSY_TIMEOUT_MS = 60_000
PAGE_SIZE = 65536
ENTRY_OVERHEAD = 48  # bytes of key and row bookkeeping per entry, for the size cap
DTYPES = {"float32": np.float32, "float16": np.float16}
FINGERPRINT_PREFIX = 8  # hex digits: the shortest fingerprint prefix `cache clear --model` takes


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


def _migration_2(db: sqlite3.Connection) -> None:
    # A CRC-32 of each entry's key digest and vector bytes; NULL for entries written
    # before (they are served unchecked, as before).
    db.execute("ALTER TABLE embeddings ADD COLUMN checksum INTEGER")


# Explicit, ordered schema migrations: entry i takes the schema from version i to i + 1.
MIGRATIONS = [_migration_1, _migration_2]
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


def _hour() -> int:
    return int(time.time() // 3600)


def checksum(digest: bytes, blob: bytes) -> int:
    """CRC-32 of an entry's key digest and vector bytes: a vector moved to another key fails it too."""
    return zlib.crc32(blob, zlib.crc32(digest))


def _is_read_only(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY or "readonly" in str(exc)


_DAMAGE_CODES = (getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26))


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """A damaged file (malformed image, not a database), not a busy lock, a full disk or a read-only file.

    Nor a closed connection, a bad parameter or a constraint (``ProgrammingError``,
    ``IntegrityError``, ... are ``DatabaseError`` subclasses too): those say nothing
    about the file, and moving a healthy file aside over them loses its vectors.
    """
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+, where SQLite raised it
    if code is not None:
        return code & 0xFF in _DAMAGE_CODES  # the primary code of an extended one (SQLITE_CORRUPT_INDEX...)
    # No code: Python 3.10, or raised by the sqlite3 module itself. SQLite's damage codes
    # come as a plain DatabaseError; every subclass is something else.
    return type(exc) is sqlite3.DatabaseError


class EmbeddingCache:
    def __init__(self, path: str | Path, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"the cache's size cap must be positive, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.verify = True  # check each vector's checksum on read (benchmarks/checks.py times it)
        self.read_only = False
        self.disabled = False  # damaged and could not be moved aside: serve nothing, store nothing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.RLock()  # connections, recovery
        self._generation = 0  # bumped by a recovery: every thread reconnects to the new file
        self._closed = False
        self._warned_closed = False
        self._checked = False
        try:
            self._open_with_retry()
            self._checked = True
        except BaseException:
            self.close()
            raise

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection, opened on its first use (the first thread's checks the schema)."""
        held = getattr(self._local, "conn", None)
        if held is not None and held[0] == self._generation:
            return held[1]
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the embedding cache is closed")
            # check_same_thread=False only so that close() may close every thread's
            # connection; each is used by the thread that opened it alone.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._connections.append(conn)
            self._local.conn = (self._generation, conn)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if self._checked:  # the first connection sets it after checking the file is ours
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

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
        apply_migrations(db, version, MIGRATIONS, APPLICATION_ID)

    @classmethod
    def open(cls, path: str | Path | None = None, max_bytes: int | None = None) -> EmbeddingCache | None:
        """Open the cache, never failing the caller's run over it.

        A corrupt or foreign file is moved aside with a warning and a fresh cache
        made; a path that cannot be used gives a warning and no cache.
        """
        path = Path(path) if path else default_path()
        if max_bytes is None and os.environ.get("METAEOL_CACHE_MAX_MB"):
            try:
                max_bytes = int(float(os.environ["METAEOL_CACHE_MAX_MB"]) * 1e6)
            except ValueError:
                raise ValueError(
                    f"METAEOL_CACHE_MAX_MB must be a size in MB, not {os.environ['METAEOL_CACHE_MAX_MB']!r}"
                ) from None
        try:
            return cls(path, max_bytes)
        except CacheError as exc:
            aside = _move_aside(path)
            if aside is None:
                warnings.warn(f"embedding cache disabled: {exc}", stacklevel=2)
                return None
            warnings.warn(f"{exc}; moved it to {aside} and started a new cache", stacklevel=2)
            return cls.open(path, max_bytes)
        except (OSError, sqlite3.OperationalError, CacheTooNewError) as exc:
            warnings.warn(f"embedding cache at {path} cannot be used ({exc}); running without a cache", stacklevel=2)
            return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- every statement goes through here ---------------------------------------------

    def _run(self, fn, default, write: bool):
        """Run ``fn(db)``; a damaged file is moved aside and ``fn`` retried on a new one.

        A write to a file that cannot be written turns the cache read-only, with
        one warning. Returns ``default`` where nothing can be done.
        """
        if self.disabled or (write and self.read_only):
            return default
        for attempt in (1, 2):
            generation = self._generation
            try:
                return fn(self.db)
            except sqlite3.OperationalError as exc:
                if _is_read_only(exc):
                    if write:
                        self._go_read_only(exc)
                    return default
                if not _is_damage(exc) or attempt == 2:
                    raise
                self._recover(exc)
            except sqlite3.ProgrammingError:
                # A closed connection: never damage, never a reason to move the file.
                if self._closed:
                    self._warn_closed()
                    return default
                if self._generation != generation and attempt == 1:
                    continue  # another thread's recovery closed this thread's connection: use the new one
                raise
            except sqlite3.DatabaseError as exc:
                if not _is_damage(exc):
                    raise
                if attempt == 2:
                    self._disable(exc)
                    return default
                self._recover(exc)
            if self.disabled:
                return default
        return default

    def _write(self, fn) -> None:
        def transaction(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        self._run(transaction, None, write=True)

    def _go_read_only(self, exc: Exception) -> None:
        with self._lock:
            if not self.read_only:
                self.read_only = True
                warnings.warn(
                    f"embedding cache {self.path} cannot be written ({exc}): serving the vectors it holds, "
                    "storing no new ones",
                    stacklevel=4,
                )

    def _warn_closed(self) -> None:
        with self._lock:
            if not self._warned_closed:
                self._warned_closed = True
                warnings.warn(
                    f"embedding cache {self.path} was used after close(): serving and storing nothing "
                    "(a shared cache is closed by whoever opened it, after its last user)",
                    stacklevel=4,
                )

    def _disable(self, exc: Exception) -> None:
        with self._lock:
            if not self.disabled:
                self.disabled = True
                warnings.warn(f"embedding cache {self.path} disabled: {exc}", stacklevel=4)

    def _recover(self, exc: Exception) -> None:
        """Move a damaged file aside and start a new cache in its place (every thread reconnects)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._generation += 1
            aside = _move_aside(self.path)
            if aside is None:
                self._disable(exc)
                return
            warnings.warn(
                f"embedding cache {self.path} is damaged ({exc}); moved it to {aside} and started a new cache",
                stacklevel=4,
            )
            self._checked = False
            try:
                self._open_with_retry()
                self._checked = True
            except (sqlite3.Error, CacheError, OSError) as again:
                self._disable(again)

    # -- reading and writing -----------------------------------------------------

    def get_many(self, keys: Sequence[CacheKey], damaged: list[CacheKey] | None = None) -> dict[CacheKey, np.ndarray]:
        """The stored vectors of these keys. A vector that fails its checksum is left out
        (a miss) and, with ``damaged``, listed there."""
        by_digest = {k.digest(): k for k in keys}
        digests = list(by_digest)

        def read(db: sqlite3.Connection) -> dict[CacheKey, np.ndarray]:
            found: dict[CacheKey, np.ndarray] = {}
            for start in range(0, len(digests), 500):
                chunk = digests[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT key, dtype, vector, checksum FROM embeddings WHERE key IN ({marks})", chunk
                ).fetchall()
                for digest, dtype, blob, crc in rows:
                    key = by_digest[digest]
                    damaged_bytes = crc is not None and self.verify and checksum(digest, blob) != crc
                    if damaged_bytes or dtype not in DTYPES:
                        if damaged is not None:
                            damaged.append(key)
                        continue
                    found[key] = np.frombuffer(blob, dtype=DTYPES[dtype]).astype(np.float32)
            return found

        return self._run(read, {}, write=False)

    def discard(self, keys: Iterable[CacheKey]) -> None:
        """Delete entries (damaged ones, before their recomputed vectors are stored)."""
        rows = [(k.digest(),) for k in keys]
        if rows:
            self._write(lambda db: db.executemany("DELETE FROM embeddings WHERE key = ?", rows))

    def touch(self, keys: Iterable[CacheKey]) -> None:
        """Mark entries as used this hour, for least-recently-used eviction.

        Hours, not seconds: a rerun within the hour then rewrites nothing.
        """
        now = _hour()
        rows = [(now, k.digest(), now) for k in keys]
        if rows:
            self._write(
                lambda db: db.executemany("UPDATE embeddings SET last_used = ? WHERE key = ? AND last_used < ?", rows)
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
                digest = key.digest()
                rows.append(
                    (
                        digest,
                        model_ids[key.model],
                        template_ids[key.template],
                        key.dtype,
                        now,
                        blob,
                        checksum(digest, blob),
                    )
                )
            # Rows go in rowid order, so pages fill completely (random keys as the
            # primary key left pages a third empty). A pair another process stored
            # meanwhile holds the same vector: vectors are deterministic.
            db.executemany(
                "INSERT OR IGNORE INTO embeddings(key, model_id, template_id, dtype, last_used, vector, checksum)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        row = self._run(
            lambda db: db.execute("SELECT size, mtime_ns, sha256 FROM files WHERE path = ?", (key,)).fetchone(),
            None,
            write=False,
        )
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
        empty: tuple[list, list, int] = ([], [], 0)
        groups, runs, entries = self._run(lambda db: self._read_stats(db, last_runs), empty, write=False)
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

    @staticmethod
    def _read_stats(db: sqlite3.Connection, last_runs: int) -> tuple[list, list, int]:
        groups = db.execute(
            """SELECT m.label, m.fingerprint, t.task, substr(t.text, 1, 60), count(*), sum(length(e.vector))
               FROM embeddings e JOIN models m ON m.id = e.model_id JOIN templates t ON t.id = e.template_id
               GROUP BY e.model_id, e.template_id ORDER BY m.label, t.task"""
        ).fetchall()
        runs = db.execute("SELECT at, model, hits, misses FROM runs ORDER BY id DESC LIMIT ?", (last_runs,)).fetchall()
        entries = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        return groups, runs, entries

    def _where(self, db: sqlite3.Connection, model: str | None, template: str | None) -> tuple[str, list]:
        """The WHERE clause (or "") of entries of a model and/or a template, matched exactly.

        A model is its label, or a prefix of at least 8 hex digits of its fingerprint:
        no LIKE, so ``%`` and ``_`` are characters, and a short label cannot reach into
        other models' fingerprints. A model that names nothing is an error, not "all".
        """
        where: list[str] = []
        args: list = []
        if model:
            ids = [r[0] for r in db.execute("SELECT id FROM models WHERE label = ?", (model,))]
            prefix = model.lower()
            if len(prefix) >= FINGERPRINT_PREFIX and all(c in "0123456789abcdef" for c in prefix):
                ids += [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM models WHERE substr(fingerprint, 1, ?) = ?", (len(prefix), prefix)
                    )
                ]
            if not ids:
                known = ", ".join(sorted({r[0] for r in db.execute("SELECT label FROM models")})) or "none"
                raise InputError(
                    f"no model in the cache is {model!r}: give a label exactly as `metaeol cache stats` shows it "
                    f"(here: {known}) or at least {FINGERPRINT_PREFIX} hex digits of a fingerprint"
                )
            where.append(f"model_id IN ({','.join(str(int(i)) for i in sorted(set(ids)))})")
        if template:
            where.append("template_id IN (SELECT id FROM templates WHERE task = ? OR text = ?)")
            args += [template, template]
        return (" WHERE " + " AND ".join(where) if where else ""), args

    def clear_plan(self, model: str | None = None, template: str | None = None) -> list[dict]:
        """What ``clear`` with these arguments would delete: entries per model (label, fingerprint)."""

        def read(db: sqlite3.Connection) -> list[dict]:
            where, args = self._where(db, model, template)
            rows = db.execute(
                "SELECT m.label, m.fingerprint, count(*) FROM embeddings JOIN models m ON m.id = model_id"
                f"{where} GROUP BY model_id ORDER BY m.label",
                args,
            ).fetchall()
            return [{"model": label, "fingerprint": fp[:12], "entries": n} for label, fp, n in rows]

        return self._run(read, [], write=False)

    def clear(self, model: str | None = None, template: str | None = None) -> int:
        """Delete entries of a model (its label, or a fingerprint prefix of 8+ hex digits) and/or a template
        (task or text); both matched exactly. Raises :class:`InputError` for a model that names none."""
        deleted = 0
        everything = not model and not template

        def run(db: sqlite3.Connection) -> None:
            nonlocal deleted
            where, args = self._where(db, model, template)
            deleted = db.execute("DELETE FROM embeddings" + where, args).rowcount
            if everything:
                db.execute("DELETE FROM runs")

        self._write(run)

        def compact(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if everything:
                db.execute("VACUUM")

        self._run(compact, None, write=True)
        return deleted

    def _files(self) -> list[Path]:
        return [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")]


def _move_aside(path: Path) -> Path | None:
    """Rename a cache file (and its WAL files) out of the way; None if it cannot be moved."""
    aside = path.with_name(f"{path.name}.unusable-{time.time_ns()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return aside  # nothing there: nothing to keep
    except OSError:
        return None
    for suffix in ("-wal", "-shm"):
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except OSError:
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return aside


# -- bringing caches together ---------------------------------------------------------


class MergeConflictError(CacheError):
    """Two caches hold different vectors under one key: nothing was merged."""


def merge_caches(target: str | Path, sources: Sequence[str | Path]) -> list[dict]:
    """Add every entry of ``sources`` that ``target`` lacks, in one transaction: all or nothing.

    The per-node caches of a Ray job, say. An entry whose key is already in the
    target (or in an earlier source) with different vector bytes is a conflict:
    the whole merge is refused and the target left as it was. A source entry
    that fails its checksum is skipped and counted. Returns, per source, the
    entries added, already present and damaged.
    """
    target = Path(target)
    paths = [Path(s) for s in sources]
    if not paths:
        raise ValueError("give at least one cache to merge")
    for src in paths:
        if not src.is_file():
            raise CacheError(f"{src} is not a file")
        if target.exists() and os.path.samefile(src, target):
            raise CacheError(f"{src} is the target cache itself")
    cache = EmbeddingCache(target)  # creates it, or checks it is ours and migrates it; never moved aside here
    db = cache.db
    results = []
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            for src in paths:
                results.append(_merge_one(db, src, target))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        cache.close()
    return results


def _merge_one(db: sqlite3.Connection, src: Path, target: Path) -> dict:
    try:
        source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise CacheError(f"cannot open {src}: {exc}") from exc
    try:
        app_id = source.execute("PRAGMA application_id").fetchone()[0]
        version = source.execute("PRAGMA user_version").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise CacheError(f"{src} is not a metaeol-edge cache")
        if version > SCHEMA_VERSION:
            raise CacheTooNewError(f"{src} has cache schema {version}, newer than this release's {SCHEMA_VERSION}")
        crc = "e.checksum" if version >= 2 else "NULL"
        rows = source.execute(
            f"""SELECT e.key, m.fingerprint, m.label, t.text, t.task, e.dtype, e.last_used, e.vector, {crc}
                FROM embeddings e JOIN models m ON m.id = e.model_id JOIN templates t ON t.id = e.template_id"""
        )
        models: dict[str, int] = {}
        templates: dict[str, int] = {}
        added = present = damaged = 0
        conflicts: list[tuple[str, str]] = []
        for key, fingerprint, label, text, task, dtype, last_used, vector, check in rows:
            if check is not None and checksum(key, vector) != check:
                damaged += 1
                continue
            held = db.execute("SELECT vector FROM embeddings WHERE key = ?", (key,)).fetchone()
            if held is not None:
                if held[0] != vector:
                    conflicts.append((label, task))
                else:
                    present += 1
                continue
            if fingerprint not in models:
                db.execute("INSERT OR IGNORE INTO models(fingerprint, label) VALUES (?, ?)", (fingerprint, label))
                models[fingerprint] = db.execute(
                    "SELECT id FROM models WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()[0]
            if text not in templates:
                db.execute("INSERT OR IGNORE INTO templates(text, task) VALUES (?, ?)", (text, task))
                templates[text] = db.execute("SELECT id FROM templates WHERE text = ?", (text,)).fetchone()[0]
            db.execute(
                "INSERT INTO embeddings(key, model_id, template_id, dtype, last_used, vector, checksum) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, models[fingerprint], templates[text], dtype, last_used, vector, checksum(key, vector)),
            )
            added += 1
    except sqlite3.DatabaseError as exc:
        raise CacheError(f"{src} cannot be read as a cache: {exc}") from exc
    finally:
        source.close()
    if conflicts:
        label, task = conflicts[0]
        raise MergeConflictError(
            f"{len(conflicts)} entries of {src} have the key of an entry already in {target} (or in an earlier "
            f"source) with different vector bytes (first: model {label}, task {task}); nothing was merged"
        )
    return {"source": str(src), "added": added, "present": present, "damaged": damaged}
