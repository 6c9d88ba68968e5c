"""``backend="auto"``: the path a sentence takes on this machine when the caller names none.

llama.cpp is the engine everywhere, except where this CPU has AMX tiles and PyTorch is installed. There
PyTorch's bfloat16 matmuls run on the tiles (oneDNN), while llama.cpp's AMX kernels die with SIGILL in the
VM we measured and its AVX-512 kernels reach about a third of PyTorch's speed per token. So there the
default is PyTorch in bfloat16 with the engine's own trick, each template's shared start computed once
(``share_prefixes``). ``python benchmarks/speed.py`` measures both paths against the PyTorch reference
(docs/benchmarks/speed.md). A laptop has no AMX, and keeps llama.cpp.

Anything only llama.cpp does (threads, lanes, a quantization level, packed mode, GPU layers, a split
file, an architecture not checked here) keeps llama.cpp, and so does ``METAEOL_BACKEND=llama.cpp``.
The choice is made from the file's header and the CPU's flags, before anything loads, because the
cache keys follow it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

AUTO = "auto"
ENV = "METAEOL_BACKEND"
TORCH_ARCHITECTURES = ("llama", "gemma3", "qwen2")
"""Architectures whose PyTorch vectors are checked against the engine's (tests/test_backend_choice.py)."""
FAST_TORCH = {"dtype": "bfloat16", "device": "cpu", "share_prefixes": True}
"""The PyTorch path auto takes: bf16 on the CPU's tiles, each template's start computed once."""


@dataclass(frozen=True)
class BackendChoice:
    name: str
    options: dict[str, object] = field(default_factory=dict)
    reason: str = ""


def requested(backend: str | None) -> str:
    """The backend asked for: ``backend``, else ``$METAEOL_BACKEND``, else ``auto``."""
    return backend or os.environ.get(ENV) or AUTO


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: no AMX is assumed)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def torch_installed() -> bool:
    """Whether PyTorch and transformers can be imported (found, not imported: importing costs seconds)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def choose(
    architecture: str,
    split_count: int,
    engine_settings: Iterable[str],
    flags: set[str],
    have_torch: bool,
) -> BackendChoice:
    """What ``auto`` runs for a file of ``architecture`` when the caller set ``engine_settings``."""
    settings = list(engine_settings)
    if settings:
        return BackendChoice("llama.cpp", reason=f"{', '.join(settings)} applies to llama.cpp")
    if "amx_bf16" not in flags:
        return BackendChoice("llama.cpp", reason="this CPU has no AMX tiles, where llama.cpp is the fastest path")
    if not have_torch:
        return BackendChoice(
            "llama.cpp",
            reason="PyTorch is not installed (with it, pip install 'metaeol-edge[reference]', this CPU's AMX "
            "tiles would run it faster than llama.cpp)",
        )
    if split_count != 1:
        return BackendChoice("llama.cpp", reason="a split file runs on llama.cpp")
    if architecture not in TORCH_ARCHITECTURES:
        return BackendChoice("llama.cpp", reason=f"PyTorch's vectors are not checked for {architecture or 'it'}")
    return BackendChoice(
        "pytorch",
        dict(FAST_TORCH),
        "this CPU's AMX tiles run PyTorch's bfloat16 matmuls faster than llama.cpp's kernels, and each "
        "template's shared start is computed once (docs/benchmarks/speed.md)",
    )


def announce(label: str, choice: BackendChoice, marker_dir: os.PathLike[str] | None) -> None:
    """Say once per machine (a marker file in ``marker_dir``) that auto left llama.cpp, and why."""
    if choice.name == "llama.cpp":
        return
    text = (
        f"metaeol: {label} runs on PyTorch ({choice.options.get('dtype')}) here, not llama.cpp: {choice.reason}. "
        f"backend='llama.cpp', --backend llama.cpp or {ENV}=llama.cpp keeps the engine."
    )
    marker = None
    if marker_dir is not None:
        marker = os.path.join(os.fspath(marker_dir), "backend-auto.noted")
        try:
            with open(marker, encoding="utf-8") as f:
                if f.read() == choice.reason:
                    return
        except OSError:
            pass
    print(text, file=sys.stderr, flush=True)
    if marker is not None:
        try:
            os.makedirs(os.fspath(marker_dir), exist_ok=True)
            with open(marker, "w", encoding="utf-8") as f:
                f.write(choice.reason)
        except OSError:
            pass  # said again next time: no harm
