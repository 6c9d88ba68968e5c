"""The ggml tensors the engine's eval callback reads and rewrites, by name and by row."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from metaeol_edge.methods.layers import FINAL, Read, attention_blocks

RESULT_NORM = b"result_norm"
GGML_TYPE_F32 = 0
ATTN_OUT = "attn_out-"
"""The name of block k's attention output in llama.cpp's graph is this and k - 1 (where the graph names it)."""


def _tensor_names(read: Read) -> list[bytes]:
    """The tensors whose rows make a read: ``result_norm``, block k's ``l_out-(k-1)``, or for an attention span
    each block's ``attn_out-(k-1)`` (its attention after W_O, before the residual add), averaged by the caller."""
    blocks = attention_blocks(read)
    if blocks:
        return [f"{ATTN_OUT}{k - 1}".encode() for k in blocks]
    return [RESULT_NORM if read == FINAL else f"l_out-{read - 1}".encode()]


class _Ggml:
    """The few ggml-base functions the eval callback needs (not bound by llama-cpp-python)."""

    def __init__(self) -> None:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        names = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
        name = names.get(sys.platform, "libggml-base.so")
        candidates = [lib_dir / name, *(lib_dir.glob("*ggml-base*"))]
        lib = None
        for path in candidates:
            if path.exists():
                lib = ctypes.CDLL(str(path))
                break
        if lib is None:  # a build that links ggml statically into libllama
            lib = ctypes.CDLL(llama_cpp.llama_cpp._lib._name)  # type: ignore[attr-defined]
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_set.restype = None
        lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.lib = lib

    @staticmethod
    def shape(tensor: int) -> tuple[int, int, int]:
        """(type, ne0, ne1): ``struct ggml_tensor`` starts with the type enum, a buffer pointer, then ne[4]."""
        type_ = ctypes.c_int32.from_address(tensor).value
        ne = (ctypes.c_int64 * 2).from_address(tensor + 16)
        return type_, ne[0], ne[1]


def copy_row(ggml: _Ggml, tensor: int, src: int, dst: int, n_embd: int, n_rows: int) -> None:
    """Overwrite row ``dst`` of an F32 (n_embd, n_rows) tensor with its row ``src``, wherever it lives (CPU, GPU)."""
    type_, ne0, ne1 = ggml.shape(tensor)
    if type_ != GGML_TYPE_F32 or ne0 != n_embd or ne1 != n_rows or ggml.lib.ggml_nbytes(tensor) != ne0 * ne1 * 4:
        name = ggml.lib.ggml_get_name(tensor).decode()
        raise RuntimeError(f"cannot rewrite {name}: type {type_}, shape ({ne0}, {ne1}), {n_rows} rows expected")
    if not (0 <= src < n_rows and 0 <= dst < n_rows):
        raise RuntimeError(f"rows {src} -> {dst} outside a tensor of {n_rows} rows")
    row = np.empty(ne0, dtype=np.float32)
    ggml.lib.ggml_backend_tensor_get(tensor, row.ctypes.data, src * ne0 * 4, ne0 * 4)
    ggml.lib.ggml_backend_tensor_set(tensor, row.ctypes.data, dst * ne0 * 4, ne0 * 4)
