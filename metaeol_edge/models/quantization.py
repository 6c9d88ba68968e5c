"""Which quantization level a model runs at: by default the fastest one that loses nothing on this CPU.

A level is ``shipped`` (the file as it is), ``auto`` (the default: decided
here), or one of llama.cpp's levels (:data:`QUANT_LEVELS`),
derived once from the shipped file's F32 dequantization into the model store.

Why ``auto`` picks F16 for Q4_1 and Q5_1 files, and nothing else:

* llama.cpp's CPU matmuls are fast for the types its tiled kernels (llamafile's
  tinyBLAS) and SIMD dot products cover, and the two legacy types with a
  per-block offset are not among the tiled ones: the shipped Q4_1 smollm2-135m is
  its slowest level here, while gemma3-270m's shipped Q4_K_M runs as fast as its
  Q8_0 copy (``python benchmarks/speed.py``, section levels).
* F16 keeps each weight of a Q4_1 or Q5_1 file (a half-precision scale times a
  4- or 5-bit integer plus a half-precision offset) to 11 significant bits, far
  finer than the file's own steps, so it loses nothing: on all STS-B test pairs
  F16 scored within 0.03 of the F32 dequantization for MetaEOL and PromptEOL,
  while Q8_0, faster on some CPUs, lost 0.19 (MetaEOL) and 1.31 (PromptEOL)
  against F32 (benchmarks/results/accuracy_full_smollm2-135m.json; ``python
  benchmarks/speed.py --accuracy`` compares ``auto`` with the shipped file).
* A big Q4_1 file stays as it is: its F16 copy would be about 3.5 times larger.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from metaeol_edge.errors import ModelError
from metaeol_edge.files import atomic_path
from metaeol_edge.llamacpp import _llama, default_threads, init_backend
from metaeol_edge.models.modelfile import inspect_gguf

AUTO = "auto"
SHIPPED = "shipped"
ENV = "METAEOL_LEVEL"
# The shipped types whose CPU kernels are the slow ones, and the level that replaces them.
SLOW_TYPES = ("Q4_1", "Q5_1")
FAST_LEVEL = "f16"
MAX_SHIPPED_BYTES = 600_000_000  # larger files stay as shipped: an F16 copy is ~3.5x the size
# llama.cpp's names (llama_print_system_info) for the SIMD its F16 kernels use.
F16_SIMD = ("AVX512", "AVX2", "F16C", "NEON")


@dataclass(frozen=True)
class LevelChoice:
    """A level and why: ``level`` is ``shipped`` or a llama.cpp level name."""

    level: str
    reason: str


def requested(level: str | None) -> str:
    """The level asked for: the argument, else ``$METAEOL_LEVEL``, else ``auto``; checked, lower case."""
    chosen = (level or os.environ.get(ENV) or AUTO).strip().lower()
    known = (AUTO, SHIPPED, *QUANT_LEVELS)
    if chosen not in known:
        source = "" if level else f" in ${ENV}"
        raise ValueError(f"unknown quantization level {chosen!r}{source}; known: {', '.join(known)}")
    return chosen


def simd(system_info: str) -> list[str]:
    """The SIMD for F16 that llama.cpp reports it was built for on this CPU, best first."""
    return [name for name in F16_SIMD if f"{name} = 1" in system_info]


def choose(quantization: str, system_info: str, size: int = 0) -> LevelChoice:
    """``auto``'s choice for a file of type ``quantization`` (``Q4_1``, ``Q4_K_M``, ...) and ``size`` bytes."""
    if quantization not in SLOW_TYPES:
        what = quantization or "its"
        return LevelChoice(SHIPPED, f"{what} weights already run on llama.cpp's fast CPU kernels")
    if size > MAX_SHIPPED_BYTES:
        return LevelChoice(SHIPPED, f"an F16 copy of this {size / 1e9:.1f} GB file would be about 3.5 times larger")
    found = simd(system_info)
    if not found:
        return LevelChoice(SHIPPED, "this CPU reports no SIMD that llama.cpp's F16 kernels use")
    return LevelChoice(
        FAST_LEVEL,
        f"{quantization} has no tiled CPU kernel in llama.cpp, while F16 holds its weights exactly and runs on this "
        f"CPU's {found[0]} (benchmarks/speed.py)",
    )


def system_info() -> str:
    """llama.cpp's report of the CPU features it was built for and found."""
    return _llama().llama_print_system_info().decode("utf-8", "replace")


QUANT_LEVELS = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
"""Quantization levels by the names llama.cpp's ``llama-quantize`` uses (lower case)."""


def quantize_file(src: str | Path, dst: str | Path, level: str, n_threads: int | None = None) -> None:
    """Write ``src`` at another quantization level with llama.cpp's own quantizer.

    A quantized source is dequantized first (``allow_requantize``), so the
    output carries the source's rounding as well as its own: quantize from an
    F32 file for a clean ladder. ``dst`` is written in full before it appears.
    """
    lc = _llama()
    if level not in QUANT_LEVELS:
        raise ValueError(f"unknown quantization level {level!r}; known: {', '.join(QUANT_LEVELS)}")
    init_backend(False)
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, QUANT_LEVELS[level])
    params.allow_requantize = True
    params.nthread = n_threads or default_threads()
    with atomic_path(Path(dst)) as tmp:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ModelError(f"llama.cpp could not write {src} as {level} (code {rc})")
        inspect_gguf(tmp)
