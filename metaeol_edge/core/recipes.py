"""The recipe over the yardstick backends, without a cache: the PyTorch reference and llama.cpp's own ``Llama.embed``.

The engine is checked and timed against these (tests, ``metaeol reference``, benchmarks);
users run :class:`metaeol_edge.MetaEOL`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend
from metaeol_edge.backends.naive import NaiveBackend
from metaeol_edge.backends.torch import TorchBackend
from metaeol_edge.core.embedder import Embedder
from metaeol_edge.methods import Method, TemplateMethod, make_method
from metaeol_edge.methods.layers import FINAL, LayerSpec, resolve_layers
from metaeol_edge.methods.prompts import TemplateSet, load_templates
from metaeol_edge.models.modelfile import inspect_gguf


class Reference(Embedder):
    """MetaEOL / PromptEOL vectors from a PyTorch model, for checking the llama.cpp engine.

    The same recipe as :class:`metaeol_edge.MetaEOL`, over :class:`TorchBackend`,
    with no cache. ``encode``'s ``batch_size`` is prompts per forward pass, and
    every sentence of a call is in one batch of the recipe, so prompts of similar
    length from the whole input are padded together.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        templates: str | os.PathLike[str] | TemplateSet = "metaeol",
        *,
        method: str | Method | None = None,
        dtype: str = "float32",
        device: str | None = None,
        preprocess: bool = True,
        layer: LayerSpec | Sequence[LayerSpec] = FINAL,
        label: str | None = None,
        max_length: int = 512,
    ) -> None:
        self.templates = templates if isinstance(templates, TemplateSet) else load_templates(templates)
        label = label or os.fspath(model)  # what reports call it (a registry id, say)
        self.model_path = Path(os.fspath(model)).expanduser()  # a file or folder, or the Hugging Face id as a path
        # Loaded at once: the reference has no cache to answer without the model.
        self._torch_backend = TorchBackend(model, dtype=dtype, device=device, label=label)
        backend = self._torch_backend
        layers, multi = resolve_layers(layer, backend.n_layer)
        super().__init__(
            make_method(method, self.templates),
            layers,
            multi,
            backend.dim,
            label=label,
            preprocess=preprocess,
            max_length=max_length,
        )
        self.method.check_depth(backend.n_layer)
        self.n_layer = backend.n_layer
        self.device = backend.device
        self.torch = backend.torch

    def _open_backend(self) -> Backend:
        return self._torch_backend

    @property
    def on_cuda(self) -> bool:
        return self._torch_backend.on_cuda

    def encode(  # type: ignore[override]
        self,
        sentences: Sequence[str],
        batch_size: int = 16,
        per_template: bool = False,
        show_progress_bar: bool = False,
    ) -> np.ndarray | list[np.ndarray]:
        """Vectors (N, dim) (mean over templates) or (N, T, dim); a list of them for several layers."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        items = list(sentences)
        self._torch_backend.batch_size = batch_size
        return super().encode(
            items, batch_size=max(1, len(items)), per_template=per_template, show_progress_bar=show_progress_bar
        )

    def close(self) -> None:
        super().close()
        self._torch_backend.close()


class NaiveRecipe(Embedder):
    """MetaEOL/PromptEOL through :class:`NaiveBackend`, no cache: ``NaiveRecipe(path, "prompteol").encode(...)``."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        templates: str | os.PathLike[str] | TemplateSet = "metaeol",
        *,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        kv_f32: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        self.templates = templates if isinstance(templates, TemplateSet) else load_templates(templates)
        self._options = dict(n_ctx=n_ctx, n_threads=n_threads, kv_f32=kv_f32)
        info = inspect_gguf(self.model_path)
        super().__init__(
            TemplateMethod(self.templates), (FINAL,), False, info.n_embd, label=str(model_path), max_length=n_ctx
        )

    def _open_backend(self) -> Backend:
        return NaiveBackend(self.model_path, **self._options)  # type: ignore[arg-type]
