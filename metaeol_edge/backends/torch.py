"""The full-precision reference: the same recipe and reads, in PyTorch.

Optional (``pip install 'metaeol-edge[reference]'``: torch, transformers,
accelerate). Loads a Hugging Face checkpoint (an id, for users with a network,
or a local folder) or a GGUF file, which transformers dequantizes to the chosen
dtype. Runs on CUDA or Apple MPS when present, else the CPU. Batches with left
padding as the official MetaEOL code does; position ids follow the attention
mask, so a padded prompt sees the positions it would see alone.

Layers follow :mod:`metaeol_edge.layers`: ``-1`` is ``hidden_states[-1]``
(after the final norm), ``k < n_layer`` is ``hidden_states[k]``, and
``k = n_layer`` is the last block's output before the final norm (Hugging
Face's ``hidden_states[n_layer]`` has the norm applied, so it is read with a hook).

Token Prepending (a prompt's ``rewrite``) is a forward pre-hook on decoder
layers ``start..stop-1``: the placeholder's row of the layer's input becomes
the last token's, in place, as the authors' ``hidden_states[b, pst] =
hidden_states[:, -1]`` (left padding keeps the last token last).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend, Progress, placeholder_row, pool_rows
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.methods import Prompt
from metaeol_edge.methods.layers import FINAL, check_resolved

DTYPES = ("float32", "float16", "bfloat16")
MAX_PREFIXES = 256  # template starts whose keys and values are kept (``share_prefixes``)


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


def _silence_gguf_bar():
    """Hide the bar transformers draws with plain tqdm (not its own switch) while it dequantizes a GGUF
    file; returns what puts it back. Where that module or name is gone, nothing changes."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return lambda: None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        return lambda: None
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable

    def restore() -> None:
        gguf_utils.tqdm = bar

    return restore


def default_device() -> str:
    torch, _ = _imports()
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TorchBackend(Backend):
    """A causal LM in PyTorch; prompts of similar length are batched together (less padding)."""

    name = "pytorch"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 16,
        label: str | None = None,
        share_prefixes: bool = False,
    ) -> None:
        if share_prefixes and "torch" not in sys.modules:
            # The fast path (auto's on a CPU with AMX): PyTorch's OpenMP threads sleep when out of work
            # instead of spinning, so a core taken by another process does not stall every matmul. That costs
            # idle speed (more for MetaEOL's many small batches) and saves a collapse when busy: the paths and
            # load sections of benchmarks/speed.py, whose load rows time both policies. Read once, when PyTorch
            # loads: the user's own setting wins, and where PyTorch is already imported it is too late and
            # nothing changes. The reference keeps PyTorch's defaults.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch, transformers = _imports()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.torch = torch
        self.dtype = dtype
        self.device = device or default_device()
        self.cache_tag = f"pytorch-{dtype}-{self.device}"
        self.batch_size = batch_size
        # The engine's trick in PyTorch: a template's shared start is computed once and its keys and values
        # reused by every prompt of the template, which then runs only its own tokens (right-padded, so no
        # real token sees a pad). Off by default: the reference runs the official recipe's batches.
        self.share_prefixes = share_prefixes
        self._prefixes: dict[tuple[int, ...], object] = {}
        self.tokens_run = 0
        self._cache_arg = "past_key_values"
        label = label or os.fspath(model)
        path = Path(os.fspath(model)).expanduser()
        kwargs: dict[str, object] = {}
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MetaEOLError(f"model file {path} does not exist")
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            source = os.fspath(model)
        # Quiet while loading: transformers draws progress bars for the GGUF dequantization and warns about
        # float32 kernels for packed weights (these are dequantized to plain tensors), on the default path too.
        log = transformers.utils.logging
        bars, level = log.is_progress_bar_enabled(), log.get_verbosity()
        log.disable_progress_bar()
        log.set_verbosity_error()
        gguf_bar = _silence_gguf_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
            lm = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
        except (OSError, ValueError) as exc:  # no such folder or hub id, no network, an unknown architecture
            raise MetaEOLError(f"transformers cannot load {label!r}: {exc}") from exc
        finally:
            gguf_bar()
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = lm.get_decoder().to(self.device).eval()
        text_config = lm.config.get_text_config()
        self.n_layer = int(text_config.num_hidden_layers)
        self.dim = int(text_config.hidden_size)
        import inspect

        if "cache" in inspect.signature(self.model.forward).parameters:  # transformers >= 5.2x renamed it
            self._cache_arg = "cache"

    @property
    def on_cuda(self) -> bool:
        return self.torch.device(self.device).type == "cuda"  # also "cuda:1"

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def states(self, prompts: Sequence[Prompt], layers: Sequence[int], progress: Progress | None = None) -> np.ndarray:
        check_resolved(layers, self.n_layer)
        if not prompts:
            return np.empty((len(layers), 0, self.dim), dtype=np.float32)
        if self.share_prefixes and all(p.pool is None and p.rewrite is None for p in prompts):
            return self._read_shared(list(prompts), list(layers), progress)
        # Batch prompts of similar length together: less padding, same vectors.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].text))
        sorted_rows = self._read_states([prompts[i] for i in order], list(layers), progress)
        rows = np.empty_like(sorted_rows)
        rows[:, order] = sorted_rows
        return rows

    def close(self) -> None:
        """Free the model (and the GPU memory it holds)."""
        self.model = None
        if self.on_cuda:
            self.torch.cuda.empty_cache()

    def _read_states(self, prompts: list[Prompt], layers: list[int], progress: Progress | None) -> np.ndarray:
        """(L, len(prompts), dim): each layer's read state of each prompt."""
        torch = self.torch
        captured: list = []
        hook = None
        if self.n_layer in layers:  # the last block's output before the final norm
            block = self.model.layers[-1]
            hook = block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        result = []
        try:
            with torch.inference_mode():
                for start in range(0, len(prompts), self.batch_size):
                    batch = prompts[start : start + self.batch_size]
                    enc = self.tokenizer([p.text for p in batch], return_tensors="pt", padding=True)
                    ids = enc["input_ids"].to(self.device)
                    mask = enc["attention_mask"].to(self.device)
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    captured.clear()
                    width = ids.shape[1]
                    lengths = mask.sum(-1).tolist()
                    rewrites = self._rewrite_hooks(batch, width, lengths)
                    try:
                        hidden = self.model(
                            input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
                        ).hidden_states
                    finally:
                        for handle in rewrites:
                            handle.remove()
                    per_layer = []
                    for layer in layers:
                        if layer == FINAL:
                            h = hidden[-1]
                        elif layer == self.n_layer:
                            h = captured[-1]
                        else:
                            h = hidden[layer]
                        per_layer.append(self._read(h, batch, width, lengths))
                    result.append(np.stack(per_layer))
                    if progress:
                        progress(len(batch))
        finally:
            if hook is not None:
                hook.remove()
        return np.concatenate(result, axis=1)

    def _read_shared(self, prompts: list[Prompt], layers: list[int], progress: Progress | None) -> np.ndarray:
        """(L, len(prompts), dim) with each template's shared token start computed once (``share_prefixes``)."""
        import copy

        torch = self.torch
        tokens = [self.tokenize(p.text) for p in prompts]
        out = np.empty((len(layers), len(prompts), self.dim), dtype=np.float32)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.prefix, []).append(i)
        captured: list = []
        hook = None
        if self.n_layer in layers:
            block = self.model.layers[-1]
            hook = block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
        pad = self.tokenizer.pad_token_id or 0
        try:
            with torch.inference_mode():
                for prefix, idx in groups.items():
                    # The shared start in tokens: the template prefix's tokens, as far as every prompt of the
                    # group begins with them (a word may tokenize across the boundary), leaving every prompt at
                    # least one token of its own. Keyed by the template, so the store stays one per template.
                    start_tokens = self.tokenize(prefix) if prefix else []
                    n = min(len(start_tokens), *(len(tokens[i]) - 1 for i in idx))
                    for i in idx:
                        k = 0
                        while k < n and tokens[i][k] == start_tokens[k]:
                            k += 1
                        n = k
                    key = tuple(start_tokens[:n])
                    if n and key not in self._prefixes:
                        if len(self._prefixes) >= MAX_PREFIXES:  # many templates over a long life: oldest out
                            self._prefixes.pop(next(iter(self._prefixes)))
                        ids = torch.tensor([start_tokens[:n]], device=self.device)
                        ran = self.model(input_ids=ids, use_cache=True)
                        # transformers >= 5.2x names the returned cache `cache` and warns on the old name.
                        self._prefixes[key] = ran["cache"] if "cache" in ran else ran["past_key_values"]
                        self.tokens_run += n
                    idx = sorted(idx, key=lambda i: len(tokens[i]))
                    for start in range(0, len(idx), self.batch_size):
                        rows = idx[start : start + self.batch_size]
                        own = [tokens[i][n:] for i in rows]
                        width = max(map(len, own))
                        ids = torch.full((len(rows), width), pad, dtype=torch.long)
                        for b, t in enumerate(own):
                            ids[b, : len(t)] = torch.tensor(t)
                        past = None
                        if n:
                            past = copy.deepcopy(self._prefixes[key])
                            past.batch_repeat_interleave(len(rows))
                        positions = (n + torch.arange(width)).expand(len(rows), width)
                        captured.clear()
                        hidden = self.model(
                            input_ids=ids.to(self.device),
                            position_ids=positions.to(self.device),
                            use_cache=past is not None,
                            **{self._cache_arg: past},
                            output_hidden_states=True,
                        ).hidden_states
                        self.tokens_run += sum(map(len, own))
                        last = torch.tensor([len(t) - 1 for t in own], device=self.device)
                        arange = torch.arange(len(rows), device=self.device)
                        for li, layer in enumerate(layers):
                            if layer == FINAL:
                                h = hidden[-1]
                            else:
                                h = captured[-1] if layer == self.n_layer else hidden[layer]
                            out[li, rows] = h[arange, last].float().cpu().numpy()
                        if progress:
                            progress(len(rows))
        finally:
            if hook is not None:
                hook.remove()
        return out

    def _rewrite_hooks(self, batch: list[Prompt], width: int, lengths: list[int]) -> list:
        """Token Prepending: pre-hooks that overwrite each placeholder's row with its prompt's last row."""
        targets = []  # (batch row, placeholder position, start, stop)
        for b, p in enumerate(batch):
            if p.rewrite is None:
                continue
            start, stop = p.rewrite.start, p.rewrite.stop
            if not 1 <= start <= stop <= self.n_layer:
                raise ValueError(f"rewrite layers {start}:{stop} must satisfy 1 <= start <= stop <= {self.n_layer}")
            if p.pool is not None:
                raise ValueError("token prepending reads the last token only, not pooled rows")
            row = placeholder_row(self.tokenize, p.text, p.rewrite.span)
            targets.append((b, width - int(lengths[b]) + row, start, stop))
        handles = []
        for k in sorted({k for *_, start, stop in targets for k in range(start, stop)}):
            rows = [(b, pos) for b, pos, start, stop in targets if start <= k < stop]

            def rewrite(module, args, kwargs, rows=rows):
                h = args[0] if args else kwargs["hidden_states"]
                for b, pos in rows:
                    h[b, pos] = h[b, -1]

            handles.append(self.model.layers[k].register_forward_pre_hook(rewrite, with_kwargs=True))
        return handles

    def _read(self, h, batch: list[Prompt], width: int, lengths: list[int]) -> np.ndarray:
        """Each prompt's read from one layer's (B, width, dim) states; left padding: the last is real."""
        if all(p.pool is None for p in batch):
            return h[:, -1, :].float().cpu().numpy()
        rows = np.empty((len(batch), self.dim), dtype=np.float32)
        for b, p in enumerate(batch):
            if p.pool is None:
                rows[b] = h[b, -1, :].float().cpu().numpy()
                continue
            start, stop = pool_rows(self.tokenize, p.text, p.pool)
            pad = width - int(lengths[b])
            rows[b] = h[b, pad + start : pad + stop, :].float().mean(0).cpu().numpy()
        return rows
