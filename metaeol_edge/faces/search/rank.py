"""Top-k by cosine: exact in NumPy, or an approximate HNSW index (usearch) above a size threshold.

:class:`Ranker` holds a collection's vectors, L2-normalised, in step with its
table: before each search it compares the table's ``generation`` with the one it
loaded, and takes the changes (ids above the last it holds are new; ids it holds
that the table lost are removed). Exact search is one matrix product and an
``argpartition``; ties go to the lower chunk id, so results are deterministic.

The approximate index is usearch's HNSW (``pip install 'metaeol-edge[search]'``):
of the libraries on PyPI it alone removes items for real (hnswlib only marks
them, faiss's HNSW cannot remove), saves, loads and memory-maps a single file, and
ships wheels. It is saved beside the collection and trusted only while its ids are
exactly the table's; otherwise it is rebuilt from the table. Its search depth is
set for recall@10 >= 0.99 against exact (``tests/test_search.py`` and
``benchmarks/retrieval.py`` measure it; :data:`EXPANSION_SEARCH`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from metaeol_edge.errors import InputError
from metaeol_edge.files import atomic_path

APPROX_THRESHOLD = 1_000_000
"""Vectors above which a collection is searched through the approximate index (when usearch is installed).
Measured alone on 2 cores (docs/benchmarks/search.md, 576 dimensions), exact search stays within issue 31's
targets up to a million vectors (p95 under 50 ms at 100k, under 200 ms at 1M), exactly, with no graph to build
(53 s at 100k) or hold (a third more memory); the graph pays where exact search would not."""
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 1024
"""The search depth (usearch's ``expansion_search``): the least of 256, 512, 1024 and 2048 that keeps recall@10
>= 0.99 against exact at 10,000, 100,000 and 1,000,000 seeded clustered vectors of 576 dimensions
(the command of ``benchmarks/results/retrieval_latency.json``; at a million: 0.942, 0.974, 0.994, 0.994, p95 3 to
13 ms, where exact search takes 126 ms). Sizes above a million are not measured."""


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def exact_top_k(matrix: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """(id, cosine) of the ``k`` rows of ``matrix`` (normalised) nearest each query (normalised), best first."""
    if len(ids) == 0:
        return [[] for _ in queries]
    scores = queries @ matrix.T  # (m, n)
    k = min(k, len(ids))
    out = []
    for row in scores:
        if k < len(row):
            # Everything scoring at least the k-th best, so that ties at the cut are broken by id.
            kth = np.partition(row, len(row) - k)[len(row) - k]
            top = np.flatnonzero(row >= kth)
        else:
            top = np.arange(len(row))
        order = np.lexsort((ids[top], -row[top]))[:k]
        out.append([(int(ids[top[i]]), float(row[top[i]])) for i in order])
    return out


def _usearch():
    try:
        from usearch.index import Index
    except ImportError as exc:
        raise InputError(
            "the approximate index needs usearch: pip install 'metaeol-edge[search]' (or search exactly)"
        ) from exc
    return Index


def have_usearch() -> bool:
    try:
        _usearch()
    except InputError:
        return False
    return True


class ApproxIndex:
    """usearch HNSW over normalised vectors, keyed by chunk id (inner product = cosine)."""

    def __init__(self, dim: int) -> None:
        Index = _usearch()
        self.dim = dim
        self.index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=CONNECTIVITY,
                           expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)  # fmt: skip

    def __len__(self) -> int:
        return len(self.index)

    @property
    def depth(self) -> int:
        """Candidates a search keeps in its beam (usearch's ``expansion_search``): recall against time."""
        return int(self.index.expansion_search)

    @depth.setter
    def depth(self, value: int) -> None:
        self.index.expansion_search = int(value)

    def keys(self) -> np.ndarray:
        return np.sort(np.asarray(self.index.keys, dtype=np.int64)) if len(self.index) else np.empty(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add(np.asarray(ids, dtype=np.uint64), normalize(vectors), threads=0)

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.index.remove(int(i))

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        if not len(self.index):
            return [[] for _ in queries]
        k = min(k, len(self.index))
        found = self.index.search(normalize(queries), k, threads=0)
        keys = np.atleast_2d(found.keys)
        distances = np.atleast_2d(found.distances)  # "ip" distance is 1 - inner product
        counts = np.atleast_1d(getattr(found, "counts", len(keys[0])))  # one query: a Matches, without counts
        out = []
        for row_keys, row_d, n in zip(keys, distances, counts, strict=True):
            pairs = [(int(key), float(1.0 - d)) for key, d in zip(row_keys[:n], row_d[:n], strict=True)]
            out.append(sorted(pairs, key=lambda p: (-p[1], p[0])))
        return out

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.index.save(str(tmp))

    @classmethod
    def load(cls, path: Path, dim: int) -> ApproxIndex | None:
        """The saved index, or None if it is missing, unreadable or of another width."""
        made = cls(dim)
        try:
            made.index.load(str(path))
        except Exception:  # noqa: BLE001 - a damaged or foreign file is rebuilt, never trusted
            return None
        return made if made.index.ndim == dim else None


class Ranker:
    """A collection's vectors for search, kept in step with its :class:`~.store.Store`.

    ``approx``: None decides by :data:`APPROX_THRESHOLD` (and whether usearch is
    installed); True always uses the index; False never.
    """

    def __init__(self, store, index_path: Path, approx: bool | None = None, threshold: int = APPROX_THRESHOLD) -> None:
        self.store = store
        self.index_path = index_path
        self.approx_wanted = approx
        self.threshold = threshold
        self.generation = -1
        self.ids = np.empty(0, dtype=np.int64)
        self.matrix: np.ndarray | None = None  # exact mode only
        self.approx: ApproxIndex | None = None
        self.rebuilt = False  # whether the last sync rebuilt the approximate index (tests look)
        self._lock = threading.RLock()

    @property
    def mode(self) -> str:
        return "approximate" if self.approx is not None else "exact"

    def _use_approx(self, n: int) -> bool:
        if self.approx_wanted is not None:
            return self.approx_wanted
        return n > self.threshold and have_usearch()

    def sync(self) -> None:
        """Take the table's changes since the last sync (all of it the first time)."""
        with self._lock:
            generation = self.store.generation()
            if generation == self.generation:
                return
            ids = self.store.ids()
            approx = self._use_approx(len(ids))
            if approx and self.approx is None:
                self._open_approx(ids)
            elif not approx and (self.matrix is None or self.approx is not None):
                self.approx = None
                self._load_exact(ids)
            else:
                self._apply_changes(ids)
            self.generation = generation

    def _load_exact(self, ids: np.ndarray) -> None:
        read = [(i, normalize(v)) for i, v in self.store.vectors()]
        dim = self.store.meta("dim") or 0
        self.matrix = np.concatenate([v for _, v in read]) if read else np.empty((0, dim), np.float32)
        self.ids = np.concatenate([i for i, _ in read]) if read else np.empty(0, np.int64)
        if not np.array_equal(self.ids, ids):  # a writer committed between the two reads: read again
            self._load_exact(self.store.ids())

    def _open_approx(self, ids: np.ndarray) -> None:
        dim = self.store.meta("dim")
        self.matrix = None
        index = ApproxIndex.load(self.index_path, dim) if self.index_path.is_file() else None
        self.rebuilt = index is None or not np.array_equal(index.keys(), ids)
        if self.rebuilt:  # missing, damaged, or not the table's ids: rebuilt, never trusted
            index = ApproxIndex(dim)
            for part_ids, vectors in self.store.vectors():
                index.add(part_ids, vectors)
        self.approx, self.ids = index, ids
        if self.rebuilt:
            self.save()

    def _apply_changes(self, ids: np.ndarray) -> None:
        gone = np.setdiff1d(self.ids, ids, assume_unique=True)
        last = int(self.ids[-1]) if len(self.ids) else 0
        new = [(i, v) for i, v in self.store.vectors(above=last)]
        new_ids = np.concatenate([i for i, _ in new]) if new else np.empty(0, np.int64)
        if self.approx is not None:
            self.approx.remove(gone)
            for part_ids, vectors in new:
                self.approx.add(part_ids, vectors)
            self.ids = np.union1d(np.setdiff1d(self.ids, gone, assume_unique=True), new_ids)
        else:
            keep = ~np.isin(self.ids, gone)
            parts = [self.matrix[keep]] + [normalize(v) for _, v in new]
            self.matrix = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self.ids = np.concatenate([self.ids[keep], new_ids])
        if not np.array_equal(self.ids, ids):  # a writer committed in between: start over from the table
            self.matrix, self.approx = None, None
            self.generation = -1
            fresh = self.store.ids()
            (self._open_approx if self._use_approx(len(fresh)) else self._load_exact)(fresh)

    def save(self) -> None:
        """Write the approximate index beside the collection (nothing in exact mode)."""
        with self._lock:
            if self.approx is not None:
                self.approx.save(self.index_path)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        with self._lock:
            self.sync()
            queries = normalize(np.atleast_2d(queries))
            if self.approx is not None:
                return self.approx.search(queries, k)
            assert self.matrix is not None
            return exact_top_k(self.matrix, self.ids, queries, k)
