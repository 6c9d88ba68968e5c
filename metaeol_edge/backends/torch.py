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

import importlib
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend, Progress, placeholder_row, pool_rows
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.methods import Prompt
from metaeol_edge.methods.layers import FINAL, Read, attention_blocks, check_resolved

DTYPES = ("float32", "float16", "bfloat16")
MAX_PREFIXES = 256  # template starts whose keys and values are kept (``share_prefixes``)
MAX_SHARED_ROWS = 64  # prompts in one forward of the shared path: MetaEOL.encode's 32 sentences fit in one


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


def _swap(module_name: str, name: str, replacement: Callable[[object], object]) -> Callable[[], None]:
    """Set ``module.name`` to ``replacement(original)`` for the length of a load; returns what puts the original
    back. Where that module or name is gone (another version of the library), nothing changes."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return lambda: None
    original = getattr(module, name, None)
    if original is None:
        return lambda: None
    setattr(module, name, replacement(original))
    return lambda: setattr(module, name, original)


def _silence_gguf_bar() -> Callable[[], None]:
    """Hide the bar transformers draws with plain tqdm (not its own switch) while it dequantizes a GGUF file."""
    return _swap("transformers.modeling_gguf_pytorch_utils", "tqdm", lambda bar: lambda iterable, *a, **k: iterable)


def _read_gguf_once() -> Callable[[], None]:
    """Parse each GGUF file once while transformers loads it.

    transformers opens the file three times (the config, the tokenizer, the tensors), and ``gguf``'s reader builds
    every metadata string through numpy views: smollm2-135m's 49,152-token vocabulary and its merges took 6.4 s a
    parse on 2 cores (cProfile, tests/test_backend_choice.py's conversion). The reader is read-only, so the three
    loads can share one. transformers imports ``GGUFReader`` from ``gguf`` at each call, which is what this swaps
    (the memo goes with the swap when the load ends)."""

    def memoized(reader):
        opened: dict[tuple[str, str], object] = {}

        def once(path, mode="r"):
            key = (os.fspath(path), mode)
            if key not in opened:
                opened[key] = reader(path, mode)
            return opened[key]

        return once

    return _swap("gguf", "GGUFReader", memoized)


_LOADING = threading.Lock()

COPY_STAMP = "metaeol-copy.json"


def torch_copy_path(path: Path, dtype: str) -> Path:
    """Where the store keeps a GGUF file's PyTorch form in ``dtype`` (safetensors and tokenizer.json).

    transformers reads a GGUF file by converting its tokenizer and dequantizing every tensor in Python, each time
    a process starts (measured alone on 2 cores: 26 s for smollm2-135m, 0.3 s from a saved folder). So the first
    load writes the folder, and later ones read it. Named by the file's SHA-256 (the pull's stamp where there is one),
    as the store's other derived files are, so a changed file never reuses a stale copy."""
    from metaeol_edge.models import digest, store

    sha = digest.fingerprint(path, store.stamped_sha256(path))
    return store.derived_path(path, sha, f"torch-{dtype}").with_suffix("")  # a folder, not a .gguf file


def _copy_is_current(folder: Path, version: str) -> bool:
    """Whether ``folder`` is a complete copy written by this transformers version (another may read it
    differently: then it is written again)."""
    import json

    try:
        stamp = json.loads((folder / COPY_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("transformers") == version


PROBE = 'A man is "playing" a guitar.\n  Ünïcödé café, naïve façade\t東京 🙂 x1,000.5 -- <s> </s>'
"""Text whose tokens a copy's tokenizer must give as the GGUF file's does (quotes, accents, CJK, emoji, spaces)."""


def _write_copy(folder: Path, lm, tokenizer, version: str) -> None:
    """Save ``lm`` and ``tokenizer`` (just read from a GGUF file) as ``folder``, checked: read back, every tensor
    equals the loaded one bit for bit, a forward pass of :data:`PROBE` gives the same states bit for bit (the
    config too), and the tokenizer the same tokens and special ids; or nothing is kept. Written beside and renamed
    into place, so a crash leaves no half copy; any failure only means the next load converts again."""
    import json
    import tempfile

    import torch
    import transformers

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    except OSError:  # a store that cannot be written: load from the GGUF file each time, as before
        return
    quantizer, config_quant = getattr(lm, "hf_quantizer", None), getattr(lm.config, "quantization_config", None)
    try:
        # The GGUF "quantization" is only how the file was read (its tensors are now plain): the folder is not.
        lm.hf_quantizer = None
        if config_quant is not None:
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=lm.dtype)
        want, got = lm.state_dict(), back.state_dict()
        if set(want) != set(got) or any(not want[k].equal(got[k]) for k in want):
            return
        back_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
        for special in (True, False):
            if (
                back_tokenizer(PROBE, add_special_tokens=special)["input_ids"]
                != tokenizer(PROBE, add_special_tokens=special)["input_ids"]
            ):
                return
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        if [getattr(back_tokenizer, k) for k in ids] != [getattr(tokenizer, k) for k in ids]:
            return
        with torch.inference_mode():
            probe = torch.tensor([tokenizer(PROBE)["input_ids"]])
            if not lm.get_decoder()(probe).last_hidden_state.equal(back.get_decoder()(probe).last_hidden_state):
                return
        del back
        (tmp / COPY_STAMP).write_text(json.dumps({"transformers": version}), encoding="utf-8")
        if _copy_is_current(folder, version):  # another process wrote it meanwhile, and may be reading it
            return
        # Another transformers version's copy, or a damaged one, is moved aside first: the name then holds a whole
        # copy or nothing at every moment.
        old = folder.with_name(f"{tmp.name}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except Exception:  # noqa: BLE001 - disk full, a version that saves otherwise: no copy, the load goes on
        return
    finally:
        lm.hf_quantizer = quantizer
        if config_quant is not None:
            lm.config.quantization_config = config_quant
        shutil.rmtree(tmp, ignore_errors=True)


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
        shared_tokens: int = 2048,
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
        self.shared_tokens = shared_tokens
        self._prefixes: dict[tuple[int, ...], object] = {}
        self._prefix_ids: dict[str, list[int]] = {}
        self.tokens_run = 0
        self._cache_arg = "past_key_values"
        label = label or os.fspath(model)
        path = Path(os.fspath(model)).expanduser()
        kwargs: dict[str, object] = {}
        if not isinstance(shared_tokens, int) or isinstance(shared_tokens, bool) or shared_tokens < 1:
            raise ValueError(f"shared_tokens must be a positive integer, not {shared_tokens!r}")
        copy = None
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MetaEOLError(f"model file {path} does not exist")
            try:
                copy = torch_copy_path(path, dtype)
            except OSError:  # the file cannot be read whole: transformers says why below
                copy = None
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            source = os.fspath(model)
        # Quiet while loading: transformers draws progress bars for the GGUF dequantization and warns about
        # float32 kernels for packed weights (these are dequantized to plain tensors), on the default path too.
        # One load at a time: the switches below are the process's (transformers' logging, gguf's reader), and
        # two loads at once (a server's models, each on its worker's thread) would put back each other's.
        with _LOADING:
            log = transformers.utils.logging
            bars, level = log.is_progress_bar_enabled(), log.get_verbosity()
            log.disable_progress_bar()
            log.set_verbosity_error()
            gguf_bar, gguf_reader = _silence_gguf_bar(), _read_gguf_once()
            try:
                lm = None
                if copy is not None and _copy_is_current(copy, transformers.__version__):
                    try:
                        self.tokenizer = transformers.AutoTokenizer.from_pretrained(copy)
                        lm = transformers.AutoModelForCausalLM.from_pretrained(copy, dtype=getattr(torch, dtype))
                        source = str(copy)
                    except Exception:  # noqa: BLE001 - a copy damaged since it was written: read again, never trusted
                        lm = None
                        shutil.rmtree(copy, ignore_errors=True)
                if lm is None:
                    self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
                    auto = transformers.AutoModelForCausalLM
                    lm = auto.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
                    if copy is not None:
                        _write_copy(copy, lm, self.tokenizer, transformers.__version__)
                self.loaded_from = source  # the GGUF file's folder, its PyTorch copy, a folder or a hub id
            except (OSError, ValueError) as exc:  # no such folder or hub id, no network, an unknown architecture
                raise MetaEOLError(f"transformers cannot load {label!r}: {exc}") from exc
            finally:
                gguf_bar()
                gguf_reader()
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

    def states(self, prompts: Sequence[Prompt], layers: Sequence[Read], progress: Progress | None = None) -> np.ndarray:
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

    def _read_states(self, prompts: list[Prompt], layers: list[Read], progress: Progress | None) -> np.ndarray:
        """(L, len(prompts), dim): each layer's read state of each prompt."""
        torch = self.torch
        captured: dict = {}
        hooks = self._hooks(layers, captured)
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
                    states = [self._layer_state(hidden, captured, k) for k in layers]
                    result.append(np.stack([self._read(h, batch, width, lengths) for h in states]))
                    if progress:
                        progress(len(batch))
        finally:
            for hook in hooks:
                hook.remove()
        return np.concatenate(result, axis=1)

    def _read_shared(self, prompts: list[Prompt], layers: list[Read], progress: Progress | None) -> np.ndarray:
        """(L, len(prompts), dim) with each template's shared token start computed once (``share_prefixes``).

        Prompts of every template share forwards: each row's past is its own template's start, left-padded to the
        longest start in the forward and masked there. MetaEOL's 8 templates then make a few big forwards instead
        of 8 small ones, which is what the CPU's matrix units and PyTorch's sleeping threads need (every forward
        wakes them hundreds of times: benchmarks/speed.py's paths section, default row). Padding sits left of every
        real token, so distances between real tokens, and with them RoPE and sliding windows, are as alone."""
        torch = self.torch
        tokens = [self.tokenize(p.text) for p in prompts]
        out = np.empty((len(layers), len(prompts), self.dim), dtype=np.float32)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.prefix, []).append(i)
        captured: dict = {}
        hooks = self._hooks(layers, captured)
        starts: dict[int, tuple[int, ...]] = {}  # prompt -> the shared start it continues (maybe empty)
        try:
            with torch.inference_mode():
                for prefix, idx in groups.items():
                    # The shared start in tokens: the template prefix's tokens, as far as every prompt of the
                    # group begins with them (a word may tokenize across the boundary), leaving every prompt at
                    # least one token of its own. Keyed by the template, so the store stays one per template.
                    start_tokens = self._prefix_tokens(prefix)
                    n = min(len(start_tokens), *(len(tokens[i]) - 1 for i in idx))
                    for i in idx:
                        k = 0
                        while k < n and tokens[i][k] == start_tokens[k]:
                            k += 1
                        n = k
                    key = tuple(start_tokens[:n])
                    if n and key not in self._prefixes:
                        ids = torch.tensor([start_tokens[:n]], device=self.device)
                        ran = self.model(input_ids=ids, use_cache=True)
                        # transformers >= 5.2x names the returned cache `cache` and warns on the old name.
                        self._prefixes[key] = ran["cache"] if "cache" in ran else ran["past_key_values"]
                        self.tokens_run += n
                    starts.update(dict.fromkeys(idx, key))
                # Evicted only now, oldest first: every start this call needs stays until its forwards have run.
                needed = set(starts.values())
                for old in [k for k in self._prefixes if k not in needed][: max(0, len(self._prefixes) - MAX_PREFIXES)]:
                    del self._prefixes[old]
                order = sorted(range(len(prompts)), key=lambda i: len(tokens[i]) - len(starts[i]))
                for rows in self._token_batches(order, [len(tokens[i]) - len(starts[i]) for i in order]):
                    for part in self._fitting(rows, starts, tokens):
                        self._forward_shared(part, starts, tokens, layers, captured, out)
                    if progress:
                        progress(len(rows))
        finally:
            for hook in hooks:
                hook.remove()
        return out

    def _fitting(self, rows: list[int], starts: dict[int, tuple[int, ...]], tokens: list[list[int]]) -> list[list[int]]:
        """``rows`` as one forward, or one per shared start where the padded starts and own tokens would reach a
        sliding-attention window (Gemma's 512 tokens): there the cache drops its oldest keys and the mask counts
        on it, and padding would move which."""
        window = getattr(self.model.config.get_text_config(), "sliding_window", None)
        longest = max(len(starts[i]) for i in rows) + max(len(tokens[i]) - len(starts[i]) for i in rows)
        if not window or longest < window - 1:
            return [rows]
        by_start: dict[tuple[int, ...], list[int]] = {}
        for i in rows:
            by_start.setdefault(starts[i], []).append(i)
        return list(by_start.values())

    def _forward_shared(
        self,
        rows: list[int],
        starts: dict[int, tuple[int, ...]],
        tokens: list[list[int]],
        layers: list[Read],
        captured: dict,
        out: np.ndarray,
    ) -> None:
        """One forward of ``rows``' own tokens (right-padded) after their shared starts (left-padded, masked),
        read into ``out``."""
        import copy

        torch = self.torch
        pad = self.tokenizer.pad_token_id or 0
        lengths = [len(starts[i]) for i in rows]
        n_max = max(lengths)
        own = [tokens[i][n:] for i, n in zip(rows, lengths, strict=True)]
        width = max(map(len, own))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, t in enumerate(own):
            ids[b, : len(t)] = torch.tensor(t)
        past, mask = None, None
        if n_max:
            keys = list(dict.fromkeys(starts[i] for i in rows))
            past = copy.deepcopy(self._prefixes[max(keys, key=len)])  # the model's own cache classes, per layer
            if len(keys) == 1:  # one start: its cache as it is, once per row (a sliding layer may hold less)
                past.batch_repeat_interleave(len(rows))
            else:  # padded on the left to the longest start (``_fitting``: each is held whole)
                which = torch.tensor([keys.index(starts[i]) for i in rows], device=self.device)
                for li, layer in enumerate(past.layers):
                    for name in ("keys", "values"):
                        stacked = []
                        for key in keys:
                            t = getattr(self._prefixes[key].layers[li], name) if key else None
                            if t is None:  # no shared start: all padding
                                t = getattr(layer, name)[:, :, :0]
                            stacked.append(torch.nn.functional.pad(t, (0, 0, n_max - t.shape[-2], 0)))
                        setattr(layer, name, torch.cat(stacked)[which])
                    if hasattr(layer, "cumulative_length"):  # sliding layers count what they hold
                        layer.cumulative_length = n_max
            if min(lengths) < n_max:
                mask = torch.ones((len(rows), n_max + width), dtype=torch.long)
                for b, n in enumerate(lengths):
                    mask[b, : n_max - n] = 0
        positions = torch.stack([n + torch.arange(width) for n in lengths])
        captured.clear()
        hidden = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=None if mask is None else mask.to(self.device),
            use_cache=past is not None,
            **{self._cache_arg: past},
            output_hidden_states=True,
        ).hidden_states
        self.tokens_run += sum(map(len, own))
        last = torch.tensor([len(t) - 1 for t in own], device=self.device)
        arange = torch.arange(len(rows), device=self.device)
        for li, layer in enumerate(layers):
            h = self._layer_state(hidden, captured, layer)
            out[li, rows] = h[arange, last].float().cpu().numpy()

    def _token_batches(self, idx: list[int], lengths: list[int]) -> list[list[int]]:
        """``idx`` (sorted by length, ``lengths`` their own tokens) cut into forwards of at most
        ``shared_tokens`` padded tokens of their own and :data:`MAX_SHARED_ROWS` prompts: few big matmuls, which
        is where the CPU's matrix units pay off, and bounded memory (each row also holds a copy of the shared
        start's keys and values) whatever the batch of sentences."""
        batches: list[list[int]] = []
        rows: list[int] = []
        for i, length in zip(idx, lengths, strict=True):
            # Sorted: ``length`` is the width the batch would have with this prompt.
            if rows and ((len(rows) + 1) * length > self.shared_tokens or len(rows) == MAX_SHARED_ROWS):
                batches.append(rows)
                rows = []
            rows.append(i)
        if rows:
            batches.append(rows)
        return batches

    def _hooks(self, layers: Sequence[Read], captured: dict) -> list:
        """Forward hooks that keep in ``captured`` what ``hidden_states`` does not give: the last block's output
        before the final norm (``"last"``, the read of layer ``n_layer``) and, for attention spans, each block's
        ``self_attn`` output, after its output projection (block number -> tensor); on Gemma that is before the
        block's post-attention norm."""
        handles = []

        def keep(key):
            return lambda m, i, o: captured.__setitem__(key, o[0] if isinstance(o, tuple) else o)

        if self.n_layer in layers:
            handles.append(self.model.layers[-1].register_forward_hook(keep("last")))
        blocks = sorted({k for layer in layers for k in attention_blocks(layer)})
        for k in blocks:
            block = self.model.layers[k - 1]
            if not hasattr(block, "self_attn"):
                for handle in handles:
                    handle.remove()
                raise MetaEOLError("this model's blocks have no self_attn module: an attention span cannot be read")
            handles.append(block.self_attn.register_forward_hook(keep(k)))
        return handles

    def _layer_state(self, hidden, captured: dict, layer: Read):
        """One read's (B, width, dim) states of the last forward: ``FINAL`` after the final norm, ``n_layer``
        from the hook, any other block's output from ``hidden_states``, an attention span its blocks' mean."""
        blocks = attention_blocks(layer)
        if blocks:
            return sum(captured[k].float() for k in blocks) / len(blocks)
        if layer == FINAL:
            return hidden[-1]
        return captured["last"] if layer == self.n_layer else hidden[layer]

    def _prefix_tokens(self, prefix: str) -> list[int]:
        """A template start's tokens, tokenized once per template (the store keeps at most MAX_PREFIXES)."""
        if not prefix:
            return []
        got = self._prefix_ids.get(prefix)
        if got is None:
            if len(self._prefix_ids) >= MAX_PREFIXES:
                self._prefix_ids.pop(next(iter(self._prefix_ids)))
            got = self._prefix_ids[prefix] = self.tokenize(prefix)
        return got

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
