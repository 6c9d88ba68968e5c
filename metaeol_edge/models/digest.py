"""What a model file is: its SHA-256 (a split model: its parts'), and the names of files derived from it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from metaeol_edge.models.modelfile import split_paths

CHUNK = 1 << 20


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


def key_digest(parts: Iterable[str]) -> bytes:
    """SHA-256 over length-prefixed UTF-8 parts: no two different part lists join to the same bytes."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()
