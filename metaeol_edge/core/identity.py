"""What names a vector: cache keys and post-processing keys.

A model file's own identity (its SHA-256, derived file names) is :mod:`metaeol_edge.models.digest`.

Everything that decides whether two vectors are the same vector lives here, so
the cache, the post-processing store and the model store agree on it. Keys
written by 0.1 stay valid: a part that 0.1 did not have (the method, the
backend) joins a key only when it differs from what 0.1 always used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metaeol_edge.models.digest import early_exit_tag, key_digest


def vector_source(fingerprint: str, exit_blocks: int | None = None, backend: str = "") -> str:
    """The model part of a cache key: the file, the early-exit copy (its last bits may differ), the backend."""
    source = fingerprint if exit_blocks is None else f"{fingerprint}:{early_exit_tag(exit_blocks)}"
    return source if not backend else f"{source}@{backend}"


@dataclass(frozen=True)
class CacheKey:
    """One stored vector: a prompt's state at a layer, for one sentence."""

    model: str  # vector_source(): model fingerprint, early exit, backend
    template: str  # the prompt's identity within its method: the template's exact text
    layer: int
    preprocess: bool
    dtype: str
    max_length: int
    sentence: str
    method: str = ""  # "" is the paper's read (last token of a filled template), as every 0.1 key

    def digest(self) -> bytes:
        parts = [
            self.model,
            self.template,
            str(self.layer),
            str(int(self.preprocess)),
            self.dtype,
            str(self.max_length),
            self.sentence,
        ]
        if self.method:
            parts.append(self.method)
        return key_digest(parts)[:16]  # 128 bits: collisions are out of reach, the index stays small


def fit_key(
    fingerprint: str, units: Sequence[str], layer: int, preprocess: bool, max_length: int, method: str = ""
) -> str:
    """The name of a post-processing fit: model file, the method's prompts, layer, pre-processing, length."""
    parts = [fingerprint, *units, str(layer), str(preprocess), str(max_length)]
    if method:
        parts.append(method)
    return key_digest(parts)[:16].hex()
