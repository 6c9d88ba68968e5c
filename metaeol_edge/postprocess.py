"""Per-dimension post-processing of sentence vectors, fitted on a corpus the user gives.

Intermediate layers of a language model carry a few dimensions with huge means
(SmolLM2: two near 100 where the median is ~2.6) that swamp the cosine.
Centring and scaling each dimension (``standardize``), or decorrelating them
too (``whiten``), fixes that. Fit on unlabeled text of the domain, never on the
sentences you evaluate. A fit is stored next to the model store, keyed like the
embedding cache (:func:`metaeol_edge.identity.fit_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError
from .files import atomic_write

KINDS = ("standardize", "whiten")


@dataclass(frozen=True)
class Postprocess:
    kind: str
    mean: np.ndarray  # (dim,)
    transform: np.ndarray  # (dim,) scale for standardize, (dim, dim) matrix for whiten
    n_fit: int

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"post-processing fitted for dimension {self.mean.shape[0]}, not {vectors.shape[-1]}")
        centred = vectors - self.mean
        out = centred * self.transform if self.kind == "standardize" else centred @ self.transform
        return out.astype(np.float32, copy=False)


def fit(vectors: np.ndarray, kind: str = "standardize") -> Postprocess:
    """Fit on (N, dim) vectors. ``whiten`` needs more sentences than dimensions to be stable."""
    if kind not in KINDS:
        raise ValueError(f"post-processing kind must be one of {', '.join(KINDS)}, not {kind!r}")
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError("fitting needs at least 2 vectors")
    if not np.isfinite(x).all():
        raise ValueError("cannot fit on non-finite vectors")
    mean = x.mean(axis=0)
    if kind == "standardize":
        std = x.std(axis=0)
        transform = 1.0 / np.maximum(std, 1e-6 * max(float(std.max()), 1e-30))
    else:
        if len(x) <= x.shape[1]:
            raise ValueError(f"whitening {x.shape[1]} dimensions needs more than {x.shape[1]} sentences, got {len(x)}")
        cov = np.cov(x - mean, rowvar=False)
        u, s, _ = np.linalg.svd(cov)
        transform = u / np.sqrt(s + 1e-6 * s[0])
    return Postprocess(kind, mean.astype(np.float32), transform.astype(np.float32), len(x))


def save(pp: Postprocess, path: Path, meta: dict[str, object]) -> None:
    with atomic_write(path) as f:
        np.savez(f, mean=pp.mean, transform=pp.transform, meta=json.dumps({**meta, "kind": pp.kind, "n_fit": pp.n_fit}))


def load(path: Path) -> Postprocess:
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return Postprocess(meta["kind"], data["mean"], data["transform"], int(meta["n_fit"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"post-processing file {path} is unreadable ({exc}); fit it again") from exc
