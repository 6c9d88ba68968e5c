"""Check a GGUF file before llama.cpp sees it, so a bad file is a clear error, not a crash."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    n_embd: int
    n_layer: int
    n_ctx_train: int
    size: int


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header; raise ModelError if it is missing, not GGUF, or truncated."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")

    from gguf import GGUFReader  # imported late: it is slow to import and not needed for ids

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # GGUFReader raises many types on a damaged file
        raise ModelError(f"{path} is a damaged or truncated GGUF file ({size} bytes): {exc}") from exc
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")

    def field(key: str) -> object:
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture: not a language model GGUF")
    n_embd = field(f"{arch}.embedding_length")
    n_layer = field(f"{arch}.block_count")
    n_ctx = field(f"{arch}.context_length")
    if not isinstance(n_embd, int) or not isinstance(n_layer, int):
        raise ModelError(f"{path}: missing {arch}.embedding_length or {arch}.block_count")
    return GGUFInfo(path, arch, n_embd, n_layer, int(n_ctx) if isinstance(n_ctx, int) else 0, size)
