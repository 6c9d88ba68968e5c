"""What names a vector: model fingerprints, cache keys, post-processing keys, derived file names.

Everything that decides whether two vectors are the same vector lives here, so
the cache, the post-processing store and the model store agree on it. Keys
written by 0.1 stay valid: a part that 0.1 did not have (the method, the
backend) joins a key only when it differs from what 0.1 always used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .modelfile import split_paths

CHUNK = 1 << 20


def key_digest(parts: Iterable[str]) -> bytes:
    """SHA-256 over length-prefixed UTF-8 parts: no two different part lists join to the same bytes."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path, known_sha256: str | None = None, memo: Callable[[Path], str] | None = None) -> str:
    """A model file's identity: its SHA-256.

    ``known_sha256``: one known without hashing (the registry's, checked at pull;
    an Ollama blob's name; a hub pull's). Else ``memo`` (the cache's table of
    hashes by path, size and mtime) or a fresh computation. A split model
    (``X-00001-of-00003.gguf``) is all its parts: :func:`split_sha256` of theirs.
    """
    if known_sha256:
        return known_sha256
    one = memo if memo is not None else sha256_file
    parts = split_paths(path)
    if len(parts) == 1 or not all(p.is_file() for p in parts):  # a whole file that merely has a part's name
        return one(path)
    return split_sha256([one(p) for p in parts])


def split_sha256(part_sha256s: Sequence[str]) -> str:
    """The identity of a split model: a digest of its parts' SHA-256s, in order (one part: its own)."""
    if len(part_sha256s) == 1:
        return part_sha256s[0]
    return key_digest(["gguf-split", *part_sha256s]).hex()


def early_exit_tag(blocks: int) -> str:
    """The tag of a model copy truncated above block ``blocks`` (its file name and its cache identity)."""
    return f"blocks{blocks}"


def derived_name(source: Path, fingerprint: str, tag: str) -> str:
    """The file name of a model made from ``source`` (another level, a truncated copy).

    Named by the source's content hash, so a changed source never reuses a stale copy.
    """
    return f"{source.stem}.{fingerprint[:12]}.{tag}.gguf"


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
