"""Post-processing of sentence vectors, fitted on unlabeled text the user gives.

A language model's hidden states are anisotropic: a few dimensions with huge
means (SmolLM2: two near 100 where the median is ~2.6) and a few dominant
directions swamp the cosine. Fitted on unlabeled text of the domain (never on
the sentences you evaluate), these transforms fix that:

* ``center``: subtract the mean;
* ``standardize``: centre and divide each dimension by its standard deviation;
* ``whiten`` / ``whiten:K``: centre and decorrelate (PCA whitening), keeping
  all dimensions or the top K (BERT-whitening, Su et al. 2021);
* ``abtt:K``: centre and remove the top K principal directions
  ("all-but-the-top", Mu & Viswanath 2018).

A fit is stored next to the model store, keyed like the embedding cache
(:func:`metaeol_edge.identity.fit_key`), or shipped in the package for a
preset (:mod:`metaeol_edge.presets`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaeol_edge.errors import ModelError
from metaeol_edge.files import atomic_write

KINDS = ("center", "standardize", "whiten", "abtt")
"""The families; ``whiten`` and ``abtt`` take ``:K`` (``whiten:128``, ``abtt:10``)."""


def parse_kind(kind: str) -> tuple[str, int | None]:
    """``"whiten:128"`` -> ``("whiten", 128)``; a clear error for anything else."""
    if not isinstance(kind, str):
        raise ValueError(f"post-processing kind must be a string, not {type(kind).__name__}")
    family, sep, arg = kind.partition(":")
    if family not in KINDS:
        raise ValueError(
            f"post-processing kind must be one of center, standardize, whiten, whiten:K, abtt:K, not {kind!r}"
        )
    if not sep:
        if family == "abtt":
            raise ValueError("abtt needs the number of directions to remove, e.g. abtt:10")
        return family, None
    if family in ("center", "standardize"):
        raise ValueError(f"{family} takes no ':K', got {kind!r}")
    try:
        k = int(arg)
    except ValueError:
        raise ValueError(f"K in {kind!r} must be a positive integer") from None
    if k < 1:
        raise ValueError(f"K in {kind!r} must be a positive integer")
    return family, k


@dataclass(frozen=True)
class Postprocess:
    kind: str
    mean: np.ndarray  # (dim,)
    transform: np.ndarray  # (dim,) per-dimension scale, or (dim, out) matrix
    n_fit: int

    @property
    def out_dim(self) -> int:
        return self.mean.shape[0] if self.transform.ndim == 1 else self.transform.shape[1]

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        if vectors.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"post-processing fitted for dimension {self.mean.shape[0]}, not {vectors.shape[-1]}")
        centred = vectors - self.mean
        out = centred * self.transform if self.transform.ndim == 1 else centred @ self.transform
        return out.astype(np.float32, copy=False)


def check_prefix(k: object, width: int, kinds: list[str] | None, name: str = "truncate_dim") -> int:
    """``k`` if the first k coordinates of vectors ``width`` wide, post-processed by ``kinds`` (one per layer;
    None: raw), are a shorter embedding of the same space; else a ``ValueError`` that says why.

    Whitening is a rotation onto the principal axes sorted by variance, scaled: its first k coordinates are the k
    directions that carry most of the corpus's variance (PCA truncation), so a prefix keeps what matters most.
    A raw, centred, standardized or abtt vector has its coordinates in the model's own order, where the first k
    are any k. The full width is always allowed: nothing is cut."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name} must be a positive integer, not {k!r}")
    if k > width:
        raise ValueError(f"{name} {k} is over the vectors' width of {width}")
    if k == width:
        return k
    plain = sorted({kind for kind in kinds or [None] if kind is None or parse_kind(kind)[0] != "whiten"}, key=str)
    if plain:
        what = ", ".join("raw (not post-processed)" if kind is None else f"{kind}-post-processed" for kind in plain)
        raise ValueError(
            f"{name} {k} needs whitened vectors, and these are {what}: whitening sorts the coordinates by variance, "
            f"so its first {k} are a shorter embedding of the same space, and the first {k} coordinates of these "
            "vectors are not. Use a preset that whitens this model's vectors (`metaeol presets` says which do, "
            "per model), or fit one with `metaeol fit-postprocess --kind whiten:K`"
        )
    return k


def shorten(vectors: np.ndarray, k: int, normalize: bool = False) -> np.ndarray:
    """The first ``k`` coordinates of (whitened) vectors, L2-normalized again if they were: a server's answer
    to a request's ``dimensions`` (checked first with :func:`check_prefix`)."""
    if k >= vectors.shape[-1]:
        return vectors
    out = vectors[..., :k]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def fit(vectors: np.ndarray, kind: str = "standardize") -> Postprocess:
    """Fit on (N, dim) vectors. ``whiten`` needs more sentences than dimensions to be stable."""
    family, k = parse_kind(kind)
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError("fitting needs at least 2 vectors")
    if not np.isfinite(x).all():
        raise ValueError("cannot fit on non-finite vectors")
    dim = x.shape[1]
    if k is not None and k > dim:
        raise ValueError(f"K in {kind!r} is over the vectors' dimension {dim}")
    mean = x.mean(axis=0)
    if family == "center":
        transform = np.ones(dim)
    elif family == "standardize":
        std = x.std(axis=0)
        transform = 1.0 / np.maximum(std, 1e-6 * max(float(std.max()), 1e-30))
    else:
        # The top K directions of a covariance are well defined from more than K sentences; all of
        # them (plain whiten) need more sentences than dimensions.
        need = k or dim
        if len(x) <= need:
            what = f"whitening {dim} dimensions" if family == "whiten" and k is None else f"{kind}"
            raise ValueError(f"{what} needs more than {need} sentences, got {len(x)}")
        cov = np.cov(x - mean, rowvar=False)
        u, s, _ = np.linalg.svd(cov)
        if family == "whiten":
            keep = k or dim
            transform = u[:, :keep] / np.sqrt(s[:keep] + 1e-6 * s[0])
        else:  # the projection onto everything but the top k directions
            top = u[:, :k]
            transform = np.eye(dim) - top @ top.T
    return Postprocess(kind, mean.astype(np.float32), transform.astype(np.float32), len(x))


def save(pp: Postprocess, path: Path, meta: dict[str, object]) -> None:
    with atomic_write(path) as f:
        np.savez(f, mean=pp.mean, transform=pp.transform, meta=json.dumps({**meta, "kind": pp.kind, "n_fit": pp.n_fit}))


def load_meta(path: Path) -> dict[str, object]:
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"post-processing file {path} is unreadable ({exc}); fit it again") from exc


def load(path: Path) -> Postprocess:
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            pp = Postprocess(meta["kind"], data["mean"], data["transform"], int(meta["n_fit"]))
        parse_kind(pp.kind)
        return pp
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"post-processing file {path} is unreadable ({exc}); fit it again") from exc
