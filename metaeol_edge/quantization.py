"""Which quantization level a model runs at: by default the fastest one that loses nothing on this CPU.

A level is ``shipped`` (the file as it is), ``auto`` (the default: decided
here), or one of llama.cpp's levels (:data:`metaeol_edge.engine.QUANT_LEVELS`),
derived once from the shipped file's F32 dequantization into the model store.

Why ``auto`` picks Q8_0 for Q4_1 and Q5_1 files, and nothing else: llama.cpp's
CPU matmuls are fast for the types its tiled kernels (llamafile's tinyBLAS) and
its SIMD dot products cover, and the two legacy types with a per-block offset are
not among the tiled ones. On this project's 2-core VMs the shipped Q4_1
smollm2-135m ran MetaEOL at about 0.55x of its Q8_0 copy, while gemma3-270m's
shipped Q4_K_M ran as fast as its Q8_0 copy (``python benchmarks/speed.py
--levels shipped,q8_0``). Q8_0 made from the F32 dequantization keeps each
weight to 1/254 of its block's largest: the STS-B test score moves by less than
0.1 (``python benchmarks/speed.py --accuracy``). F16 and BF16 lose nothing
either, and measured no faster than Q8_0 at twice its size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AUTO = "auto"
SHIPPED = "shipped"
ENV = "METAEOL_LEVEL"
# The shipped types whose CPU kernels are the slow ones, and the level that replaces them.
SLOW_TYPES = ("Q4_1", "Q5_1")
FAST_LEVEL = "q8_0"
# llama.cpp's names (llama_print_system_info) for the SIMD its 8-bit kernels use.
INT8_SIMD = ("AVX512_VNNI", "AVX_VNNI", "AVX2", "DOTPROD", "NEON")


@dataclass(frozen=True)
class LevelChoice:
    """A level and why: ``level`` is ``shipped`` or a llama.cpp level name."""

    level: str
    reason: str


def requested(level: str | None) -> str:
    """The level asked for: the argument, else ``$METAEOL_LEVEL``, else ``auto``; checked, lower case."""
    from .engine import QUANT_LEVELS

    chosen = (level or os.environ.get(ENV) or AUTO).strip().lower()
    known = (AUTO, SHIPPED, *QUANT_LEVELS)
    if chosen not in known:
        source = "level" if level else f"${ENV}"
        raise ValueError(f"unknown {source} {chosen!r}; known: {', '.join(known)}")
    return chosen


def simd(system_info: str) -> list[str]:
    """The 8-bit-capable SIMD that llama.cpp reports it was built for on this CPU, best first."""
    return [name for name in INT8_SIMD if f"{name} = 1" in system_info]


def choose(quantization: str, system_info: str) -> LevelChoice:
    """``auto``'s choice for a file of type ``quantization`` (``Q4_1``, ``Q4_K_M``, ...) on this CPU."""
    if quantization not in SLOW_TYPES:
        what = quantization or "its"
        return LevelChoice(SHIPPED, f"{what} weights already run on llama.cpp's fast CPU kernels")
    found = simd(system_info)
    if not found:
        return LevelChoice(SHIPPED, "this CPU reports no SIMD that llama.cpp's 8-bit kernels use")
    return LevelChoice(
        FAST_LEVEL,
        f"{quantization} has no tiled CPU kernel in llama.cpp and this CPU has {found[0]}: Q8_0 ran about 1.8x "
        "faster at the same STS-B score (benchmarks/speed.py)",
    )


def system_info() -> str:
    """llama.cpp's report of the CPU features it was built for and found."""
    from .engine import _llama

    return _llama().llama_print_system_info().decode("utf-8", "replace")
