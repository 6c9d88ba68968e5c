"""Check a GGUF file before llama.cpp sees it, so a bad file is a clear error, not a crash.

The header is parsed here rather than with ``gguf.GGUFReader``, which decodes
every tensor and the whole vocabulary into Python objects: seconds for a 262k-token
vocabulary, on every start. This reads only what the checks need.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from metaeol_edge.errors import ModelError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> struct format of a scalar of that type
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


# Architectures llama.cpp runs as encoders only: no causal language-model head for MetaEOL to prompt.
EMBEDDING_ONLY = frozenset(
    {"bert", "modern-bert", "neo-bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "t5encoder"}
)
# A split model's parts, as llama.cpp's gguf-split names them (llama_split_path): PREFIX-00001-of-00003.gguf.
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    n_embd: int
    n_layer: int
    n_ctx_train: int
    size: int  # bytes, all parts of a split model together
    file_type: int | None = None  # general.file_type: the quantization the file was written at
    split_count: int = 1

    @property
    def quantization(self) -> str:
        return quantization_name(self.file_type)


def quantization_name(file_type: object) -> str:
    """``general.file_type`` as llama.cpp names it (15 -> Q4_K_M); "" when absent or unknown."""
    from gguf import LlamaFileType

    if not isinstance(file_type, int) or isinstance(file_type, bool):
        return ""
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return ""
    return "" if name == "GUESSED" else name.removeprefix("MOSTLY_").removeprefix("ALL_")


def split_paths(path: str | Path, count: int | None = None) -> list[Path]:
    """Every part of the split model whose first part is ``path`` (just ``[path]`` for a whole file).

    ``count`` is the first part's ``split.count`` where its header was read; else
    the file name says it. llama.cpp finds the other parts the same way, by name.
    """
    path = Path(path)
    m = SPLIT_NAME.match(path.name)
    if m is None or int(m["no"]) != 1:
        return [path]
    n = count if count is not None else int(m["count"])
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def unusable_reason(meta: dict[str, object], path: Path) -> str | None:
    """Why a GGUF file is no model MetaEOL can prompt (an encoder, a projector), or None."""
    arch = meta.get("general.architecture")
    if arch == "clip" or path.name.lower().startswith("mmproj"):
        return "a multimodal projector (mmproj), not a language model"
    if arch in EMBEDDING_ONLY:
        return f"an embedding-only encoder ({arch}): no causal language-model head to prompt"
    if meta.get(f"{arch}.pooling_type") is not None and meta.get(f"{arch}.attention.causal") is False:
        return f"an embedding-only model ({arch} with pooling and non-causal attention)"
    return None


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Truncated
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _SCALARS:  # fixed width: skip in one step
                self.take(count * struct.calcsize(_SCALARS[etype]))
            elif etype == _STRING:  # a vocabulary: 100k+ strings, skipped without slicing or decoding them
                buf, pos, end = self.buf, self.pos, len(self.buf)
                for _ in range(count):
                    if pos + 8 > end:
                        raise _Truncated
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                if pos > end:
                    raise _Truncated
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header; raise ModelError if it is missing, not GGUF, truncated, or no causal LM.

    For a split model, ``path`` is its first part (the one with the metadata);
    every other part must be there and whole too.
    """
    path = Path(path)
    meta, size = read_header(path)
    return info_from_header(path, meta, size)


def read_header(path: str | Path) -> tuple[dict[str, object], int]:
    """(scalar and string metadata, file size); ModelError if missing, not GGUF, truncated or damaged."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:
            raise ModelError(f"{path} is truncated ({size} bytes)") from exc
    try:
        meta, end = _parse(_Cursor(buf))
    except _Truncated:
        raise ModelError(f"{path} is truncated: its header ends past the file's {size} bytes") from None
    except (ValueError, KeyError, struct.error, UnicodeError) as exc:
        raise ModelError(f"{path} is a damaged GGUF file: {exc}") from exc
    finally:
        buf.close()
    # Each part of a split model lists only its own tensors: the check holds part by part.
    if end > size:
        raise ModelError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}")
    return meta, size


def info_from_header(path: Path, meta: dict[str, object], size: int) -> GGUFInfo:
    """The checks of :func:`inspect_gguf` on a header already read."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture: not a language model GGUF")
    reason = unusable_reason(meta, path)
    if reason:
        raise ModelError(f"{path} is {reason}; MetaEOL needs a causal language model")
    n_embd, n_layer = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.block_count")
    if not isinstance(n_embd, int) or not isinstance(n_layer, int):
        raise ModelError(f"{path}: missing {arch}.embedding_length or {arch}.block_count")
    n_ctx = meta.get(f"{arch}.context_length")
    count = meta.get("split.count")
    count = count if isinstance(count, int) and count > 1 else 1
    if count > 1:
        parts = split_paths(path, count)
        if len(parts) != count:  # llama.cpp finds the other parts by this name only
            raise ModelError(f"{path} is part 1 of a {count}-part model but not named PREFIX-00001-of-{count:05d}.gguf")
        for part in parts[1:]:
            size += read_header(part)[1]  # missing or truncated parts are refused here, not by llama.cpp
    file_type = meta.get("general.file_type")
    return GGUFInfo(
        path,
        arch,
        n_embd,
        n_layer,
        n_ctx if isinstance(n_ctx, int) else 0,
        size,
        file_type if isinstance(file_type, int) else None,
        count,
    )


def _parse(cur: _Cursor) -> tuple[dict[str, object], int]:
    """Return (scalar and string metadata, the byte offset where the last tensor ends)."""
    cur.take(4)
    version = cur.scalar("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("I"))
    last_end = 0
    for _ in range(n_tensors):
        cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        ggml_type, offset = cur.scalar("I"), cur.scalar("Q")
        last_end = max(last_end, offset + _tensor_bytes(ggml_type, dims))
    align = meta.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    data_start = (cur.pos + align - 1) // align * align
    return meta, data_start + last_end


def truncate_gguf(src: str | Path, dst: str | Path, n_blocks: int) -> None:
    """Write a copy of a GGUF model that keeps only its first ``n_blocks`` transformer blocks.

    llama.cpp then computes nothing above block ``n_blocks`` (early exit); the
    blocks it keeps are byte-for-byte the original's, so their outputs are the
    same. Per-layer array metadata (e.g. head counts per block) is cut to match.
    Written with the ``gguf`` package; ``dst`` appears only when complete.
    """
    import gguf

    from metaeol_edge.files import atomic_path

    info = inspect_gguf(src)
    if info.split_count > 1:  # the reader below sees the first part's tensors only
        raise ModelError(f"{src} is a split model: no truncated copy of it is written (run it whole)")
    if not 1 <= n_blocks < info.n_layer:
        raise ValueError(f"n_blocks must lie in 1..{info.n_layer - 1}, not {n_blocks}")
    reader = gguf.GGUFReader(str(src))
    arch = info.architecture
    keep = [t for t in reader.tensors if _block_index(t.name) < n_blocks]
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
                continue
            vtype = field.types[0]
            value = field.contents()
            sub_type = None
            if vtype == gguf.GGUFValueType.ARRAY:
                sub_type = field.types[-1]
                if key.startswith(f"{arch}.") and len(value) == info.n_layer:
                    value = value[:n_blocks]
            if key == f"{arch}.block_count":
                value = n_blocks
            if key == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(value)
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for t in keep:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in keep:
            writer.write_tensor_data(t.data)
        writer.close()
        check = inspect_gguf(tmp)
        if check.n_layer != n_blocks:  # a gguf package whose writer changed
            raise ModelError(f"writing {dst} failed: it has {check.n_layer} blocks, not {n_blocks}")


def _block_index(tensor_name: str) -> int:
    """The block number of a ``blk.N.*`` tensor, -1 for the others (embeddings, output)."""
    parts = tensor_name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else -1
