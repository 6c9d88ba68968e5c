"""The full-precision reference: the same prompts and last-token rule, in PyTorch.

Optional (``pip install 'metaeol-edge[reference]'``: torch, transformers,
accelerate). Loads a Hugging Face checkpoint (an id, for users with a network,
or a local folder) or a GGUF file, which transformers dequantizes to the chosen
dtype. Runs on CUDA or Apple MPS when present, else the CPU. Batches with left
padding as the official MetaEOL code does; position ids follow the attention
mask, so a padded prompt sees the positions it would see alone.

Layers follow :func:`metaeol_edge.engine.resolve_layer`: ``-1`` is
``hidden_states[-1]`` (after the final norm), ``k < n_layer`` is
``hidden_states[k]``, and ``k = n_layer`` is the last block's output before the
final norm (Hugging Face's ``hidden_states[n_layer]`` has the norm applied, so
it is read with a hook).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .engine import FINAL, resolve_layers
from .errors import MetaEOLError
from .prompts import TemplateSet, load_templates, preprocess

DTYPES = ("float32", "float16", "bfloat16")


def _imports():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MetaEOLError(
            f"the reference backend needs PyTorch and transformers ({exc.name} is missing): "
            "pip install 'metaeol-edge[reference]'"
        ) from exc
    return torch, transformers


def default_device() -> str:
    torch, _ = _imports()
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Reference:
    """MetaEOL / PromptEOL vectors from a PyTorch model, for checking the llama.cpp engine."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        templates: str | os.PathLike[str] | TemplateSet = "metaeol",
        *,
        dtype: str = "float32",
        device: str | None = None,
        preprocess: bool = True,
        layer: int | float | str | Sequence[int | float | str] = FINAL,
        label: str | None = None,
    ) -> None:
        torch, transformers = _imports()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.torch = torch
        self.device = device or default_device()
        self.templates = templates if isinstance(templates, TemplateSet) else load_templates(templates)
        self.preprocess = preprocess
        self.model_label = label or os.fspath(model)  # what reports call it (a registry id, say)
        path = Path(os.fspath(model)).expanduser()
        self.model_path = path  # a file or folder, or the Hugging Face id as a path
        kwargs: dict[str, object] = {}
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MetaEOLError(f"model file {path} does not exist")
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            source = os.fspath(model)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
            lm = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
        except (OSError, ValueError) as exc:  # no such folder or hub id, no network, an unknown architecture
            raise MetaEOLError(f"transformers cannot load {self.model_label!r}: {exc}") from exc
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = lm.get_decoder().to(self.device).eval()
        text_config = lm.config.get_text_config()
        self.n_layer = int(text_config.num_hidden_layers)
        self.dim = int(text_config.hidden_size)
        self.layers, self._multi = resolve_layers(layer, self.n_layer)
        self.layer = self.layers[0]  # as MetaEOL.layer: the (first) layer read

    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 16,
        per_template: bool = False,
        show_progress_bar: bool = False,
    ) -> np.ndarray | list[np.ndarray]:
        """Vectors (N, dim) (mean over templates) or (N, T, dim); a list of them for several layers."""
        texts = [preprocess(s.strip()) if self.preprocess else s.strip() for s in sentences]
        if not texts:
            empty = np.empty((0, len(self.templates), self.dim) if per_template else (0, self.dim), np.float32)
            return [empty] * len(self.layers) if self._multi else empty
        prompts = [t.render(s) for s in texts for t in self.templates.templates]
        # Batch prompts of similar length together: less padding, same vectors.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        sorted_rows = self._last_token_states([prompts[i] for i in order], batch_size, show_progress_bar)
        rows = np.empty_like(sorted_rows)
        rows[:, order] = sorted_rows
        n_t = len(self.templates)
        out = []
        for layer_rows in rows:
            per = layer_rows.reshape(len(texts), n_t, -1)
            out.append(per if per_template else per.mean(axis=1, dtype=np.float32))
        return out if self._multi else out[0]

    def close(self) -> None:
        """Free the model (and the GPU memory it holds)."""
        self.model = None
        if self.on_cuda:
            self.torch.cuda.empty_cache()

    @property
    def on_cuda(self) -> bool:
        return self.torch.device(self.device).type == "cuda"  # also "cuda:1"

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _last_token_states(self, prompts: list[str], batch_size: int, progress: bool = False) -> np.ndarray:
        """(L, len(prompts), dim): each layer's state of each prompt's last token."""
        torch = self.torch
        captured: list = []
        hook = None
        if self.n_layer in self.layers:  # the last block's output before the final norm
            block = self.model.layers[-1]
            hook = block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        result = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="prompt", desc="reference", file=sys.stderr, dynamic_ncols=True)
        try:
            with torch.inference_mode():
                for start in range(0, len(prompts), batch_size):
                    enc = self.tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
                    ids = enc["input_ids"].to(self.device)
                    mask = enc["attention_mask"].to(self.device)
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    captured.clear()
                    hidden = self.model(
                        input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
                    ).hidden_states
                    per_layer = []
                    for layer in self.layers:
                        if layer == FINAL:
                            h = hidden[-1]
                        elif layer == self.n_layer:
                            h = captured[-1]
                        else:
                            h = hidden[layer]
                        per_layer.append(h[:, -1, :].float().cpu().numpy())  # left padding: last is real
                    result.append(np.stack(per_layer))
                    if bar is not None:
                        bar.update(len(per_layer[0]))
        finally:
            if hook is not None:
                hook.remove()
            if bar is not None:
                bar.close()
        return np.concatenate(result, axis=1)
