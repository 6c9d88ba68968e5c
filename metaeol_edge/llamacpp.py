"""llama.cpp's library: loaded once per process, quiet, and with model parameters safe on this CPU.

The lowest layer: the engine, the naive recipe and the quantizer all load
llama.cpp through here, so the AMX workaround (:func:`use_extra_bufts`) and the
log filter hold for every load.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

# ggml's log levels (ggml.h): llama-cpp-python's own _logger.py lists an older order.
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # continues the previous message
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64


def _llama():
    import llama_cpp  # imported late: the CLI's model and cache verbs never load it

    return llama_cpp


_backend_ready = False
_log_callback = None
_log_lock = threading.Lock()


def init_backend(verbose: bool) -> None:
    """Initialise llama.cpp once per process and keep its log quiet unless asked."""
    global _backend_ready, _log_callback
    with _log_lock:
        if _backend_ready:
            return
        lc = _llama()
        lc.llama_backend_init()

        shows = LogFilter(verbose)

        @lc.llama_log_callback
        def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if shows(level):
                sys.stderr.write(text.decode("utf-8", "replace"))

        _log_callback = _log  # keep a reference: llama.cpp holds the pointer
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _backend_ready = True


class LogFilter:
    """Which llama.cpp log lines reach stderr: errors (and their continuations), or all when verbose."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._last = False

    def __call__(self, level: int) -> bool:
        show = self.verbose or level == GGML_LOG_LEVEL_ERROR or (level == GGML_LOG_LEVEL_CONT and self._last)
        if level != GGML_LOG_LEVEL_CONT:
            self._last = show
        return show


def _os_grants_amx() -> bool:
    """Whether this process may run AMX tile instructions (what the kernel must allow)."""
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
        if "amx_tile" not in flags.split():
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except OSError:
        return False


def use_extra_bufts(system_info: str, os_grants_amx: Callable[[], bool] = _os_grants_amx) -> bool:
    """Decide whether llama.cpp may use its extra CPU buffer types (AMX, repacked weights).

    Off by default, for two reasons. A llama.cpp built with ``GGML_NATIVE`` on a
    CPU that reports AMX gets AMX kernels, and inside some VMs the kernel never
    grants the tile state, so the first AMX matmul dies with SIGILL. And the
    repacked-weight kernels round differently for 1-3 rows than for 4, so a
    prompt's vector would depend on how it is split across decodes (up to 0.002
    in cosine on Gemma 3), which prefix sharing does. No speed was lost here without
    them (benchmarks/speed.py with METAEOL_EXTRA_BUFTS=1 vs 0).
    ``METAEOL_EXTRA_BUFTS=1`` turns them on, except AMX where the OS forbids it.
    """
    if os.environ.get("METAEOL_EXTRA_BUFTS") != "1":
        return False
    if "AMX_INT8 = 1" in system_info or "AMX = 1" in system_info:
        return os_grants_amx()
    return True


def model_params(n_gpu_layers: int):
    """llama.cpp model parameters that are safe on this CPU; every load goes through here."""
    lc = _llama()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    info = lc.llama_print_system_info().decode("utf-8", "replace")
    params.use_extra_bufts = use_extra_bufts(info)
    return params


@contextmanager
def safe_model_params():
    """Make llama-cpp-python's high-level ``Llama`` load with :func:`model_params` too.

    ``Llama`` offers no ``use_extra_bufts`` argument; it builds its parameters from
    ``llama_model_default_params``, which this swaps for the duration of the load.
    """
    import llama_cpp.llama as high

    original = high.llama_cpp.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = model_params(0).use_extra_bufts
        return params

    high.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = original


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
