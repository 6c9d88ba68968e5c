"""Backends: where a method's prompts become hidden states.

Every backend answers one question, :meth:`Backend.states`: for these prompts,
the state of the token(s) each one asks for, at these layers. The recipe
(:mod:`metaeol_edge.embedder`) is written once on top of it. These are built in:

* ``llama.cpp`` (:class:`LlamaCppBackend`): the engine of :mod:`metaeol_edge.engine`,
  what users run;
* ``pytorch`` (:class:`metaeol_edge.reference.TorchBackend`): the full-precision
  reference, extra ``[reference]``; with ``share_prefixes`` and bfloat16 it is
  what ``auto`` runs on a CPU with AMX tiles (:mod:`metaeol_edge.backends.choice`);
* ``naive`` (:class:`metaeol_edge.naive.NaiveBackend`): llama.cpp's own
  ``Llama.embed``, the yardstick the engine is checked and timed against;
* ``fake``: states hashed from the text, no model run (the logic tests).

``auto`` (the default) picks llama.cpp or PyTorch for this machine.

A backend is used by one thread at a time: the embedder holds a lock around it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaeol_edge.methods import Prompt
from metaeol_edge.methods.layers import Read

Progress = Callable[[float], None]
"""Called with the number of prompts done since the last call (a fraction while a long one runs)."""


class Backend(ABC):
    """Hidden states of prompts from one model."""

    name: str = ""
    cache_tag: str = ""
    """Joins the cache key's model part: "" for the llama.cpp engine, whose vectors 0.1 cached."""
    n_layer: int
    dim: int
    n_ctx_train: int | None = None

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """The model's tokens for ``text`` (with BOS where the model wants one)."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str: ...

    @abstractmethod
    def states(self, prompts: Sequence[Prompt], layers: Sequence[Read], progress: Progress | None = None) -> np.ndarray:
        """(len(layers), len(prompts), dim) float32: each prompt's read state at each layer."""

    def close(self) -> None:  # noqa: B027 - a backend without resources has nothing to free
        pass


def pool_rows(tokenize: Callable[[str], list[int]], text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The token rows [start, stop) of the characters ``text[span[0]:span[1]]``.

    Counted as the tokens of ``text[:start]`` and ``text[:stop]``: a BPE merge
    across either edge moves the boundary by a token, the same way in every
    backend. At least one row.
    """
    a, b = span
    if not 0 <= a < b <= len(text):
        raise ValueError(f"pool span {span} lies outside a prompt of {len(text)} characters")
    start = len(tokenize(text[:a])) if a else len(tokenize(""))
    stop = len(tokenize(text[:b]))
    return min(start, stop - 1), stop


def placeholder_row(tokenize: Callable[[str], list[int]], text: str, span: tuple[int, int]) -> int:
    """The token row of Token Prepending's placeholder ``text[span[0]:span[1]]``, checked to be one token.

    One token, and the same token in the whole prompt as in ``text[:span[1]]``
    (no BPE merge with either neighbour): every backend then rewrites the same row.
    """
    a, b = span
    if not 0 < a < b <= len(text):
        raise ValueError(f"placeholder span {span} lies outside a prompt of {len(text)} characters")
    before, upto, full = tokenize(text[:a]), tokenize(text[:b]), tokenize(text)
    if len(upto) != len(before) + 1 or upto[: len(before)] != before or full[: len(upto)] != upto:
        raise ValueError(
            f"the placeholder {text[a:b]!r} is not one token of its own in {text[: b + 20]!r}...: "
            "choose another placeholder"
        )
    if len(upto) >= len(full):
        raise ValueError("the placeholder must come before the prompt's last token")
    return len(upto) - 1


class LlamaCppBackend(Backend):
    """The llama.cpp engine: shared template prefixes, early graph stop, any layer."""

    name = "llama.cpp"
    cache_tag = ""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        max_length: int = 512,
        verbose: bool = False,
        mode: str = "one-at-a-time",
        pack: int | None = None,
        n_batch: int = 512,
        align: int = 16,
        lanes: int | None = None,
    ) -> None:
        from metaeol_edge.backends.engine import Engine

        self.engine = Engine(
            model_path,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            max_length=max_length,
            verbose=verbose,
            mode=mode,
            pack=pack,
            n_batch=n_batch,
            align=align,
            lanes=lanes,
        )
        self.cache_tag = llama_cpp_cache_tag({"mode": mode, "align": align, "n_gpu_layers": n_gpu_layers})
        self.model_path = Path(model_path)
        self.n_layer = self.engine.n_layer
        self.dim = self.engine.n_embd
        self.n_ctx_train = self.engine.n_ctx_train
        self._prefix_tokens: dict[str, list[int]] = {}

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.detokenize(tokens)

    def states(self, prompts: Sequence[Prompt], layers: Sequence[Read], progress: Progress | None = None) -> np.ndarray:
        from metaeol_edge.backends.engine import Prompt as EnginePrompt

        engine_prompts = []
        for p in prompts:
            if p.prefix not in self._prefix_tokens:  # "" too: its BOS is still worth sharing
                self._prefix_tokens[p.prefix] = self.engine.tokenize(p.prefix)
            rows = None if p.pool is None else pool_rows(self.engine.tokenize, p.text, p.pool)
            rewrite = None
            if p.rewrite is not None:
                row = placeholder_row(self.engine.tokenize, p.text, p.rewrite.span)
                rewrite = (row, p.rewrite.start, p.rewrite.stop)
            tokens = self.engine.tokenize(p.text)
            engine_prompts.append(EnginePrompt(tokens, self._prefix_tokens[p.prefix], rows, rewrite))
        return self.engine.embed(engine_prompts, progress=progress, layers=list(layers))

    def close(self) -> None:
        self.engine.close()


def llama_cpp_cache_tag(options: dict[str, object]) -> str:
    """The engine's cache tag: "" one prompt per decode on the CPU (the 0.1 keys); ``packed``, or
    ``packed-alignN`` for another alignment, whose vectors differ in the last bits. Layers offloaded
    to a GPU (other kernels, other low bits) add the device and how many layers went there:
    ``gpu-cuda-ngl99``, ``packed-gpu-metal-nglall``. On a llama.cpp build without GPU offload,
    ``n_gpu_layers`` changes nothing, and nor does the key: CPU keys stay 0.2's."""
    parts = []
    if options.get("mode", "one-at-a-time") != "one-at-a-time":
        align = options.get("align", 16)
        parts.append("packed" if align == 16 else f"packed-align{align}")
    layers = options.get("n_gpu_layers", 0)
    if layers:
        device = gpu_device()
        if device is not None:
            parts.append(f"gpu-{device}-ngl{'all' if layers < 0 else layers}")  # type: ignore[operator]
    return "-".join(parts)


def gpu_device() -> str | None:
    """The GPU backend llama.cpp offloads to (``cuda``, ``metal``, ``vulkan``...), or None when this
    build offloads nothing. Read from llama.cpp's system information, once."""
    global _GPU_DEVICE
    if _GPU_DEVICE is None:
        from metaeol_edge.llamacpp import _llama

        lc = _llama()
        found = ""
        if lc.llama_supports_gpu_offload():
            info = lc.llama_print_system_info().decode("utf-8", "replace")
            names = [part.split(":")[0].strip() for part in info.split("|") if ":" in part]
            names = [n for n in names if n and n.upper() != "CPU" and " " not in n]
            found = "-".join(dict.fromkeys(n.lower() for n in names)) or "gpu"
        _GPU_DEVICE = found
    return _GPU_DEVICE or None


_GPU_DEVICE: str | None = None


@dataclass(frozen=True)
class BackendSpec:
    """A backend by name: how to make one for a model file, and what it adds to cache keys."""

    name: str
    factory: Callable[..., Backend]
    cache_tag: Callable[[dict[str, object]], str]


def _naive(model_path: Path, **options: object) -> Backend:
    from metaeol_edge.backends.naive import NaiveBackend

    return NaiveBackend(model_path, **options)  # type: ignore[arg-type]


def _pytorch(model_path: Path, **options: object) -> Backend:
    from metaeol_edge.backends.torch import TorchBackend

    return TorchBackend(model_path, **options)  # type: ignore[arg-type]


def _pytorch_tag(options: dict[str, object]) -> str:
    # Shared template starts give the same vectors in other matmul shapes: equal to about 1e-7, not in bits.
    tag = f"pytorch-{options.get('dtype', 'float32')}-{options.get('device', '')}"
    return tag + ("-shared" if options.get("share_prefixes") else "")


def _fake(model_path: Path, **options: object) -> Backend:
    from metaeol_edge.backends.fake import FakeBackend

    return FakeBackend(model_path, **options)  # type: ignore[arg-type]


def _fake_tag(options: dict[str, object]) -> str:
    from metaeol_edge.backends.fake import cache_tag

    return cache_tag(options)


_BACKENDS: dict[str, BackendSpec] = {
    "llama.cpp": BackendSpec("llama.cpp", LlamaCppBackend, llama_cpp_cache_tag),
    "naive": BackendSpec("naive", _naive, lambda options: "naive"),
    "pytorch": BackendSpec("pytorch", _pytorch, _pytorch_tag),
    # Deterministic states from text alone, no model run: the tests of everything but the engine.
    "fake": BackendSpec("fake", _fake, _fake_tag),
}


def register_backend(spec: BackendSpec, *, replace: bool = False) -> None:
    """Make a backend available by name (``MetaEOL(..., backend=name)``). Its cache tag must not be empty."""
    if spec.name in _BACKENDS and not replace:
        raise ValueError(f"a backend named {spec.name!r} is already registered")
    if not spec.cache_tag({}):
        raise ValueError("a new backend needs a non-empty cache tag: its vectors are not the engine's")
    _BACKENDS[spec.name] = spec


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def spec_for(name: str) -> BackendSpec:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    return _BACKENDS[name]


def open_backend(name: str, model_path: Path, **options: object) -> Backend:
    return spec_for(name).factory(model_path, **options)
