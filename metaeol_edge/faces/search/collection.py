"""``Collection``: index folders and tables into chunks with vectors, and search them by meaning.

>>> notes = Collection.open("notes", model="smollm2-135m")    # made on first use, under the data dir
>>> notes.index("~/notes")                                      # again later: only what changed
>>> for hit in notes.search("how do I renew my passport", k=5):
...     print(f"{hit.score:.3f} {hit.where}  {hit.text[:60]}")

Conventions are ``MetaEOL.encode``'s: a single query string gives a list of
hits, a list of queries a list of such lists; ``batch_size`` and
``show_progress_bar`` mean the same. A collection is one SQLite file in
``collections/`` under the user data dir (``$METAEOL_HOME``, or
``$METAEOL_COLLECTIONS`` for the folder itself); a name holds no path separator,
and a path (``./x.sqlite3``) may be given instead of a name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metaeol_edge.errors import InputError
from metaeol_edge.faces.search import config as cfg
from metaeol_edge.faces.search.chunking import Budget, split_text
from metaeol_edge.faces.search.rank import APPROX_THRESHOLD, Ranker, normalize
from metaeol_edge.faces.search.sources import (
    Found,
    Settings,
    Skipped,
    Unreadable,
    absolute,
    content_hash,
    decode_text,
    read_bytes,
    table_rows,
    walk,
)
from metaeol_edge.faces.search.store import NewChunk, NewFile, Store
from metaeol_edge.models import store

ENV = "METAEOL_COLLECTIONS"
SUFFIX = ".sqlite3"
MAX_K = 1000
MAP_TEXT_CHARS = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def collections_dir() -> Path:
    """Where named collections live: ``$METAEOL_COLLECTIONS``, else ``collections/`` in the user data dir."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else store.home() / "collections"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise InputError(
            f"{name!r} is not a collection name: use letters, digits, '.', '_' and '-' (at most 64, "
            "no path separator), or give a path ending in .sqlite3"
        )
    return name


def collection_path(name_or_path: str | os.PathLike[str]) -> tuple[str, Path]:
    """(name, file) of a collection given by name, or by a path (one with a separator or ending in .sqlite3)."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text or text.endswith(SUFFIX):
        path = Path(absolute(text))
        return path.name.removesuffix(SUFFIX), path
    return check_name(text), collections_dir() / f"{text}{SUFFIX}"


def list_collections() -> list[dict[str, Any]]:
    """A summary of each collection in :func:`collections_dir`, by name."""
    folder = collections_dir()
    out = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        try:
            store = Store(path)
        except InputError as exc:
            out.append({"name": path.name.removesuffix(SUFFIX), "path": str(path), "error": str(exc)})
            continue
        try:
            out.append(_summary(path.name.removesuffix(SUFFIX), path, store))
        finally:
            store.close()
    return out


def remove_collection(name_or_path: str | os.PathLike[str]) -> Path:
    """Delete a collection's file (and its index); the path removed."""
    name, path = collection_path(name_or_path)
    if not path.is_file():
        raise InputError(f"no collection {name} (no file {path}); see `metaeol collections list`")
    Store(path).close()  # refuse to delete a file that is not a collection
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    path.with_suffix(".usearch").unlink(missing_ok=True)
    path.unlink()
    return path


def _summary(name: str, path: Path, store: Store) -> dict[str, Any]:
    chunks, files = store.counts()
    identity = store.meta("identity") or {}
    return {
        "name": name,
        "path": str(path),
        "chunks": chunks,
        "files": files,
        "model": identity.get("model"),
        "config": identity,
        "options": store.meta("options") or {},
        "roots": store.roots(),
    }


@dataclass(frozen=True)
class Hit:
    """One result: rank from 1, cosine score, the chunk's file and lines (a table's row), its id and text."""

    rank: int
    score: float
    path: str
    line: int
    line_end: int
    chunk_id: int
    text: str
    row_id: str | None = None  # a table row's id column, as JSON

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        """The HTTP API's shape (``POST /v1/search``)."""
        keys = ("rank", "score", "path", "line", "line_end", "chunk_id", "text")
        return {k: getattr(self, k) for k in keys}


@dataclass
class IndexReport:
    """What one ``index`` did: files added, changed, unchanged, removed; chunks embedded, reused (a
    stored chunk with the same content), removed; files skipped with why; seconds."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    chunks_removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Pending:
    found: Found
    sha256: str
    new: bool
    chunks: list[tuple[int, int, str | None, bytes, str]]  # line, line_end, row_id, hash, text
    vectors: list[np.ndarray | None]
    missing: int


class Collection:
    """A collection of chunks with vectors, made with one configuration. Use :meth:`open`."""

    def __init__(self, name: str, path: Path, store: Store | None, options: dict[str, Any], overlap: int,
                 runtime: dict[str, Any], approx: bool | None) -> None:  # fmt: skip
        self.name, self.path = name, path
        self._store = store
        self.options = options  # what the vectors depend on, as stored
        self.overlap = overlap
        self._runtime = runtime  # cache, n_threads, truncate, ...: the caller's, never stored
        self._approx = approx
        self._model = None
        self._ranker: Ranker | None = None

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        create: bool = True,
        overlap: int | None = None,
        approx: bool | None = None,
        cache: bool | str | os.PathLike[str] = True,
        n_threads: int | None = None,
        truncate: bool = True,
        **options: Any,
    ) -> Collection:
        """Open a collection by name or path; ``create`` makes a new one with these options.

        ``options`` are ``MetaEOL``'s (``model``, ``preset``, ``templates``, ``layer``, ``backend``,
        ``max_length``, ...). For an existing collection, any option given must agree with what it was
        made with: a difference is refused, naming it. ``overlap``: tokens repeated between
        consecutive chunks (new collections; default 0). ``approx``: True or False forces or forbids the
        approximate index (default: by size). ``cache``, ``n_threads`` and ``truncate`` (a query
        longer than ``max_length`` is cut, with a warning, or refused) are this process's choice.
        """
        name, path = collection_path(name_or_path)
        runtime = {"cache": cache, "n_threads": n_threads, "truncate": truncate}
        given = cfg.chosen(options)
        if not path.is_file():
            if not create:
                raise InputError(
                    f"no collection {name} (no file {path}): make it with `metaeol index {name} PATH...`; "
                    "see `metaeol collections list`"
                )
            made = cls._new(name, path, None, given, overlap or 0, runtime, approx)
            made.model  # noqa: B018 - checks the options now (nothing is written before the first index)
            return made
        store = Store(path)
        stored = store.meta("options")
        if stored is None:  # created, killed before its configuration was written: nothing else is in it
            made = cls._new(name, path, store, given, overlap or 0, runtime, approx)
        else:
            identity = store.meta("identity") or {}
            made = cls(name, path, store, stored | given, identity.get("overlap", 0) if overlap is None else overlap,
                       runtime, approx)  # fmt: skip
        if given or overlap is not None:
            try:
                made.model  # noqa: B018 - refuse another configuration at once
            except BaseException:
                made.close()
                raise
        return made

    @classmethod
    def _new(cls, name, path, store, given, overlap, runtime, approx) -> Collection:
        """A collection not yet configured: ``given``, or the default method where it names none (the
        quality preset; its prompt and read without the fit for a model the preset ships no fit for)."""
        options = cfg.with_default_method(given)
        if options is not given:
            from metaeol_edge.core.config import EmbedConfig
            from metaeol_edge.core.embedder import MetaEOL

            # Built only to ask where its fit is: nothing is loaded.
            with MetaEOL.from_config(EmbedConfig.of(**(options | runtime))) as model:
                if model.postprocess and model.postprocess_source() is None:
                    options = given | cfg.WITHOUT_FIT
        return cls(name, path, store, options, overlap, runtime, approx)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise InputError(f"collection {self.name} is empty: index something first")
        return self._store

    @property
    def model(self):
        """The ``MetaEOL`` of this collection (built on first need; its identity checked against the stored)."""
        if self._model is None:
            from metaeol_edge.core.config import EmbedConfig
            from metaeol_edge.core.embedder import MetaEOL

            stored = self._store.meta("identity") if self._store is not None else None
            model = MetaEOL.from_config(EmbedConfig.of(**(self.options | self._runtime)))
            try:
                identity = cfg.identity(model, self.overlap)
                message = cfg.difference(self.name, stored, identity) if stored is not None else None
                if message:
                    earlier = self._earlier_revision(model, stored, identity)
                    if earlier is None:
                        raise InputError(message)
                    current, (model, identity) = model, earlier
                    current.close()
            except BaseException:
                model.close()
                raise
            self._identity = identity
            self._model = model
        return self._model

    def _earlier_revision(self, model, stored: dict[str, Any], identity: dict[str, Any]):
        """A collection made with a preset by its bare name (``quality``, before collections pinned the
        revision) whose revision has since been replaced: the earlier revision whose vectors it holds, as
        (model, identity), or None. Tried only where what differs is what a revision sets."""
        from metaeol_edge.core.config import EmbedConfig
        from metaeol_edge.core.embedder import MetaEOL
        from metaeol_edge.errors import MetaEOLError

        named = self.options.get("preset")
        if model.preset is None or not isinstance(named, str) or "@" in named:
            return None
        # What a revision sets, and the vectors' source: a revision's layers decide where the model may stop
        # (early exit), so its vectors may come from another file. The earlier revision's whole identity is
        # compared below, so nothing else can match by this.
        if not set(cfg.differing(stored, identity)) <= {"vectors", "prompts", "layer", "postprocess", "dim"}:
            return None
        for revision in sorted(model.preset.earlier, reverse=True):
            options = self.options | {"preset": f"{named}@{revision}"}
            try:
                other = MetaEOL.from_config(EmbedConfig.of(**(options | self._runtime)))
            except (MetaEOLError, ValueError):
                continue
            try:
                identity = cfg.identity(other, self.overlap)
            except BaseException:
                other.close()
                raise
            if not cfg.differing(stored, identity):
                self.options = options  # held for this process; the file is not rewritten by a read
                return other, identity
            other.close()
        return None

    @property
    def ranker(self) -> Ranker:
        if self._ranker is None:
            self._ranker = Ranker(self.store, self.path.with_suffix(".usearch"), self._approx)
        return self._ranker

    def _create(self) -> None:
        """Write the file and its configuration (the first index, once its inputs are known to be there)."""
        if self._store is None:
            self._store = Store(self.path, create=True)
        if self._store.meta("options") is None:
            model = self.model
            options = self.options | {"level": model.level}  # as resolved here: `auto` may differ elsewhere
            if model.preset is not None:  # `quality@2`, not `quality`: the preset may move on, these vectors not
                options["preset"] = model.preset.pinned
            self._store.set_meta({"options": options, "identity": self._identity, "dim": model.dim,
                                  "name": self.name, "created": time.time()})  # fmt: skip
            self.options = options

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._ranker = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it holds -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """name, path, chunks, files, model, config (the identity), options, roots."""
        if self._store is None:
            return {"name": self.name, "path": str(self.path), "chunks": 0, "files": 0, "model": None,
                    "config": {}, "options": self.options, "roots": {}}  # fmt: skip
        return _summary(self.name, self.path, self._store)

    def __len__(self) -> int:
        return self.store.counts()[0] if self._store is not None else 0

    # -- indexing -----------------------------------------------------------------------------------

    def index(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        *,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        text_column: str = "text",
        id_column: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> IndexReport:
        """Bring the collection in step with ``paths`` (folders or files; default: those indexed before).

        Files new or changed (size and time, then content hash) are read, chunked and embedded, except
        chunks whose content the collection already holds; files gone from under a path are removed.
        ``include``/``exclude``: glob patterns on the path relative to the folder or on the file name
        (default: text, source code and tables by suffix; hidden files and folders are left out).
        ``text_column``/``id_column``: what ``.jsonl``, ``.csv`` and ``.parquet`` files are read by.
        Files are committed a batch at a time: a killed run leaves the collection usable, and the
        same call again finishes it.
        """
        from metaeol_edge.faces.bulk import job_lock

        t0 = time.monotonic()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        settings = Settings(tuple(include), tuple(exclude), text_column, id_column)
        roots = self._roots(paths, settings)
        report = IndexReport()
        found: dict[str, Found] = {}
        for root, root_settings in roots.items():
            files, skipped = walk(root, root_settings)
            if not files and not skipped:
                raise InputError(
                    f"{root} holds no files to index (text, source code, .jsonl, .csv, .parquet; hidden files "
                    "are left out): give --include GLOB to choose files by name"
                )
            report.skipped.extend(skipped)
            for f in files:
                found.setdefault(f.path, f)
        model = self.model  # the configuration is checked before anything is written
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = job_lock(self.path)  # a flock the kernel drops when the process dies: a kill never blocks a rerun
        try:
            lock.__enter__()
        except InputError as exc:
            if "another job" not in str(exc):
                raise
            raise InputError(
                f"collection {self.name} is being indexed by another process right now: wait for it to finish"
            ) from None
        try:
            self._create()
            store = self.store
            before = store.roots()
            for root, root_settings in roots.items():
                if before.get(root) != root_settings.to_json():
                    store.set_root(root, root_settings.to_json())
            stored = store.files()
            gone = [p for p, sf in stored.items() if sf.root in roots and p not in found]
            report.chunks_removed += store.remove_files(gone)
            report.removed += len(gone)
            todo: list[tuple[Found, str, bool]] = []
            touch = []
            for f in found.values():
                sf = stored.get(f.path)
                same_settings = before.get(f.root) == roots[f.root].to_json()
                if sf is not None and sf.kind == f.kind and (sf.size, sf.mtime_ns) == (f.size, f.mtime_ns) \
                        and (same_settings or f.kind == "text"):  # fmt: skip
                    report.unchanged += 1
                    continue
                try:
                    data = read_bytes(f)
                    if f.kind == "text":
                        decode_text(data)  # binary or not UTF-8: skipped here, before any model is loaded
                    sha = content_hash(data, f.kind, roots[f.root])
                except Unreadable as exc:
                    self._skip(report, f, str(exc), sf is not None)
                    continue
                if sf is not None and sf.sha256 == sha and sf.kind == f.kind:
                    touch.append((sf.id, f.size, f.mtime_ns))
                    report.unchanged += 1
                else:
                    todo.append((f, sha, sf is None))
            store.touch(touch)
            if todo:
                self._embed_files(model, todo, roots, report, batch_size, show_progress_bar)
        finally:
            lock.__exit__(None, None, None)
        if self._ranker is not None or self._approx or (self._approx is None and len(self) > APPROX_THRESHOLD):
            self.ranker.sync()  # a server reading this file finds the approximate index saved, in step
            self.ranker.save()
        report.seconds = time.monotonic() - t0
        return report

    def _roots(self, paths, settings: Settings) -> dict[str, Settings]:
        if paths is None or (not isinstance(paths, str | os.PathLike) and not list(paths)):
            stored = self._store.roots() if self._store is not None else {}
            if not stored:
                raise InputError(f"collection {self.name} has no folders yet: give the paths to index")
            return {root: Settings.from_json(s) for root, s in stored.items()}
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        return {absolute(p): settings for p in paths}

    def _skip(self, report: IndexReport, f: Found, reason: str, stored: bool) -> None:
        report.skipped.append(Skipped(f.path, reason))
        if stored:  # what it held is no longer the file's content
            report.chunks_removed += self.store.remove_files([f.path])
            report.removed += 1

    def _chunks(self, f: Found, budget: Budget, settings: Settings) -> tuple[str, list[tuple]]:
        """(content hash, chunks) of a file as it is now."""
        data = read_bytes(f)
        sha = content_hash(data, f.kind, settings)
        out = []
        if f.kind == "text":
            for c in split_text(decode_text(data), budget):
                out.append((c.line, c.line_end, None, _hash(c.text), c.text))
        else:
            for row, id_, text in table_rows(f, settings):
                row_id = None if id_ is None else json.dumps(id_, default=str)
                for c in split_text(text, budget):
                    out.append((row, row, row_id, _hash(c.text), c.text))
        return sha, out

    def _embed_files(self, model, todo, roots, report: IndexReport, batch_size: int, show: bool | None) -> None:
        store = self.store
        budget: list[Budget] = []  # made for the first file read: it loads the model's tokenizer
        if show is None:
            show = sys.stderr.isatty()
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="file", desc=f"indexing {self.name}", file=sys.stderr, dynamic_ncols=True)
        waiting: deque[tuple[_Pending, int]] = deque()  # (file, chunk) per text sent to the model, in order
        open_files: list[_Pending] = []

        def texts() -> Iterator[str]:
            for f, _, new in todo:
                try:
                    if not budget:
                        budget.append(Budget.for_model(model, self.overlap))
                    sha, chunks = self._chunks(f, budget[0], roots[f.root])
                except Unreadable as exc:
                    self._skip(report, f, str(exc), not new)
                    if bar is not None:
                        bar.update(1)
                    continue
                known = store.vectors_by_hash(h for *_, h, _ in chunks)
                vectors = [known.get(h) for *_, h, _ in chunks]
                pending = _Pending(f, sha, new, chunks, vectors, sum(v is None for v in vectors))
                report.chunks_reused += len(chunks) - pending.missing
                open_files.append(pending)
                for i, v in enumerate(vectors):
                    if v is None:
                        waiting.append((pending, i))
                        yield chunks[i][4]

        def commit() -> None:
            ready = [p for p in open_files if p.missing == 0]
            if not ready:
                return
            store.put_files([_new_file(p) for p in ready])
            for p in ready:
                open_files.remove(p)
                if p.new:
                    report.added += 1
                else:
                    report.changed += 1
            if bar is not None:
                bar.update(len(ready))
                bar.set_postfix(chunks=report.chunks_embedded, refresh=False)

        try:
            # Chunks fit max_length by construction: truncate=False makes any surprise an error, never a cut.
            for batch in model.encode_batches(texts(), batch_size, normalize_embeddings=True,
                                              show_progress_bar=False, truncate=False):  # fmt: skip
                for vector in batch:
                    pending, i = waiting.popleft()
                    pending.vectors[i] = vector
                    pending.missing -= 1
                report.chunks_embedded += len(batch)
                commit()
            commit()  # files with nothing to embed
        finally:
            if bar is not None:
                bar.close()

    # -- searching ----------------------------------------------------------------------------------

    def embed_queries(self, queries: Sequence[str], batch_size: int = 32, show_progress_bar: bool | None = False):
        """The queries' vectors (normalised), as the collection's chunks were embedded."""
        for i, q in enumerate(queries, 1):
            if not isinstance(q, str):
                raise InputError(f"query #{i} must be a string, not {type(q).__name__}")
            if not q.strip():
                raise InputError(f"query #{i} is empty or whitespace only")
        return self.model.encode(list(queries), batch_size=batch_size, normalize_embeddings=True,
                                 show_progress_bar=show_progress_bar)  # fmt: skip

    def search(
        self, query: str | Sequence[str], k: int = 10, *, batch_size: int = 32, show_progress_bar: bool | None = False
    ) -> list[Hit] | list[list[Hit]]:
        """The ``k`` chunks nearest each query by cosine, best first: a list of :class:`Hit` for one
        query string, a list of lists for a list of queries."""
        _check_k(k)
        single = isinstance(query, str)
        if isinstance(query, bytes | bytearray):
            raise InputError("the query must be str, not bytes: decode it first")
        queries = [query] if single else list(query)
        if not queries:
            return []
        vectors = self.embed_queries(queries, batch_size, show_progress_bar)
        hits = self._hits(self.ranker.search(vectors, k))
        return hits[0] if single else hits

    def similar(self, path: str | os.PathLike[str], line: int | None = None, k: int = 10) -> list[Hit]:
        """The ``k`` chunks nearest a stored chunk: the one of ``path`` that holds ``line`` (a table's
        row; default its first), itself left out. No model is run."""
        _check_k(k)
        chunk = self.chunk_at(path, line)
        vector = self.store.vectors_of([chunk.id])
        (found,) = self.ranker.search(vector, k + 1)
        return self._hits([[(i, s) for i, s in found if i != chunk.id][:k]])[0]

    def chunk_at(self, path: str | os.PathLike[str], line: int | None = None):
        """The stored chunk of ``path`` that holds ``line`` (else the last one starting before it)."""
        if line is not None and (not isinstance(line, int) or isinstance(line, bool) or line < 1):
            raise InputError(f"line must be a positive integer, not {line!r}")
        where = absolute(path)
        rows = self.store.chunks_of_file(where)
        if not rows:
            known = self.store.files()
            hint = " (it is stored with no text)" if where in known else f"; index it with `metaeol index {self.name}`"
            raise InputError(f"{where} is not in collection {self.name}{hint}")
        if line is None:
            return rows[0]
        holding = [r for r in rows if r.line <= line <= r.line_end]
        if holding:
            return holding[0]
        before = [r for r in rows if r.line <= line]
        return before[-1] if before else rows[0]

    def _hits(self, results: list[list[tuple[int, float]]]) -> list[list[Hit]]:
        rows = self.store.chunks([i for found in results for i, _ in found])
        out = []
        for found in results:
            hits = []
            for rank, (i, score) in enumerate((p for p in found if p[0] in rows), 1):
                r = rows[i]
                hits.append(Hit(rank, round(score, 6), r.path, r.line, r.line_end, r.id, r.text, r.row_id))
            out.append(hits)
        return out

    def remove(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> int:
        """Remove files (or everything under folders) from the collection; the number of files removed.
        Removed folders are no longer indexed again by a later ``index()`` without paths."""
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        wanted = [absolute(p) for p in paths]
        files = self.store.files()
        gone = [p for p in files if any(p == w or p.startswith(w.rstrip(os.sep) + os.sep) for w in wanted)]
        roots = self.store.roots()
        if not gone and not any(w in roots for w in wanted):
            raise InputError(f"nothing of {', '.join(wanted)} is in collection {self.name}")
        self.store.remove_files(gone)
        for w in wanted:
            if w in roots:
                self.store._write(lambda db, w=w: db.execute("DELETE FROM roots WHERE path = ?", (w,)))
        return len(gone)

    # -- the map -----------------------------------------------------------------------------------

    def map(self, limit: int = 10_000, seed: int = 0) -> dict[str, Any]:
        """A 2-D PCA projection of the chunks' vectors (a seeded sample of ``limit`` when there are more)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100_000:
            raise InputError(f"limit must be an integer from 1 to 100000, not {limit!r}")
        ids = self.store.ids()
        total = len(ids)
        sampled = total > limit
        if sampled:
            ids = np.sort(np.random.default_rng(seed).choice(ids, limit, replace=False))
        vectors = normalize(self.store.vectors_of(ids)) if len(ids) else np.empty((0, 2), np.float32)
        xy = pca_2d(vectors)
        rows = self.store.chunks(ids)
        points = []
        for i, (x, y) in zip(ids, xy, strict=True):
            r = rows[int(i)]
            text = r.text if len(r.text) <= MAP_TEXT_CHARS else r.text[: MAP_TEXT_CHARS - 1] + "…"
            points.append({"chunk_id": r.id, "x": float(x), "y": float(y), "path": r.path, "line": r.line,
                           "text": text})  # fmt: skip
        return {"collection": self.name, "total": total, "sampled": sampled, "points": points}


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components' coordinates (n, 2), float64; each axis's sign fixed so that its
    largest loading is positive (the same data always gives the same picture)."""
    n = len(vectors)
    if n < 2:
        return np.zeros((n, 2))
    x = vectors.astype(np.float64) - vectors.mean(axis=0, dtype=np.float64)
    _, eigvecs = np.linalg.eigh(x.T @ x)
    axes = eigvecs[:, ::-1][:, :2]
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), [0, 1]])
    return x @ (axes * np.where(signs == 0, 1, signs))


def _check_k(k: object) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InputError(f"k must be an integer from 1 to {MAX_K}, not {k!r}")


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


def _new_file(p: _Pending) -> NewFile:
    chunks = [NewChunk(seq, line, line_end, row_id, h, text, p.vectors[seq])
              for seq, (line, line_end, row_id, h, text) in enumerate(p.chunks)]  # fmt: skip
    f = p.found
    return NewFile(f.path, f.root, f.kind, f.size, f.mtime_ns, p.sha256, chunks)
