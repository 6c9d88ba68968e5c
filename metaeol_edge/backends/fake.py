"""A fake backend: deterministic hidden states from text alone, for testing everything but the engine.

``MetaEOL(path, backend="fake")`` runs the whole recipe (method, cache,
truncation, post-processing, every face) with no llama.cpp call: the model
file is read for its header only (``n_layer``, ``n_embd``, context length), as
for any backend, and never loaded. :func:`write_model` writes such a file in a
few kilobytes, with the header of the registry's default model (smollm2-135m:
30 blocks, 576 dimensions, 8192 tokens of context), so tests written against
that model's shapes hold on the fake.

What it keeps of a real model, so that the logic around it is tested for real:

* a tokenizer that merges: a token is a word or one punctuation character with
  the whitespace before it (roughly a BPE's granularity), BOS first; it
  detokenizes back to the text, so truncation, pooled spans and Token
  Prepending's one-token placeholder check behave as with a real model;
* causal states: a token's state depends on that token and everything before
  it, never on what follows, and never on the other prompts of a call (batch
  composition cannot change a vector);
* a state per layer: every layer (``FINAL`` and blocks 1..n_layer) and every
  attention span (``attn:22-30``) gives another vector; a Token Prepending
  rewrite changes the states above its first block;
* the same prompt, layer and seed give the same bits in any process; sentences
  that share words get similar vectors (a bag of words plus an order term), so
  similarities have a sign worth looking at.

What it does not keep: the numbers. Vectors are no model's, and its cache tag
(``fake``) keeps them apart from every real backend's in a shared cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend, Progress, placeholder_row, pool_rows
from metaeol_edge.methods import Prompt
from metaeol_edge.methods.layers import Read, check_resolved, top_block
from metaeol_edge.models.modelfile import inspect_gguf

BOS = 1
"""The id of the beginning-of-sequence token, added with ``add_special``."""

# A word, or one other non-space character, with the whitespace before it; trailing whitespace alone.
# Every character falls in exactly one piece, so joining the pieces gives the text back.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

# The per-(layer, piece) vectors are memoised; past this many entries the memo starts over, so a
# long bulk run keeps bounded memory.
_MEMO_LIMIT = 200_000

DELAY_VARIABLE = "METAEOL_FAKE_DELAY"
"""Seconds each prompt takes, for tests that need work in flight (a kill or a SIGTERM mid-job): an
environment variable, so that worker processes and ``metaeol`` subprocesses get it too."""


def cache_tag(options: dict[str, object]) -> str:
    """``fake``, or ``fake-seedN`` for another seed: never "" (its vectors are no engine's)."""
    seed = options.get("seed", 0)
    return "fake" if seed == 0 else f"fake-seed{seed}"


class FakeBackend(Backend):
    """Hidden states made from the prompt's text by hashing: no model is run."""

    name = "fake"

    def __init__(
        self, model_path: str | Path, *, seed: int = 0, max_length: int | None = None, delay: float | None = None
    ) -> None:
        """``seed`` gives another, equally deterministic, set of vectors (another "model"); ``max_length``
        refuses longer prompts as the engine does (None: no limit, the embedder's own cut is the only one);
        ``delay``: seconds per prompt (default ``$METAEOL_FAKE_DELAY``, else none). Neither ``max_length``
        nor ``delay`` changes a vector."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"the fake backend's seed must be an integer, not {seed!r}")
        info = inspect_gguf(model_path)  # the same header checks as any backend: a bad file is a ModelError
        self.model_path = Path(model_path)
        self.n_layer = info.n_layer
        self.dim = info.n_embd
        self.n_ctx_train = info.n_ctx_train or None
        self.seed = seed
        self.max_length = max_length
        self.delay = float(os.environ.get(DELAY_VARIABLE) or 0) if delay is None else delay
        self.cache_tag = cache_tag({"seed": seed})
        self._pieces: dict[int, str] = {}  # token id -> text, filled as texts are tokenized
        self._memo: dict[tuple[int, str], np.ndarray] = {}
        self.calls = 0
        """How many times :meth:`states` ran (tests use it to see that a cached run computed nothing)."""

    # -- tokens ----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        tokens = [BOS] if add_special else []
        for piece in _PIECE.findall(text):
            token = _piece_id(piece)
            self._pieces.setdefault(token, piece)
            tokens.append(token)
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        try:
            return "".join(self._pieces[t] for t in tokens if t != BOS)
        except KeyError as exc:
            raise ValueError(f"token {exc.args[0]} was not made by this fake backend's tokenizer") from None

    # -- states ------------------------------------------------------------------------

    def states(self, prompts: Sequence[Prompt], layers: Sequence[Read], progress: Progress | None = None) -> np.ndarray:
        check_resolved(layers, self.n_layer)
        self.calls += 1
        out = np.empty((len(layers), len(prompts), self.dim), dtype=np.float32)
        for k, p in enumerate(prompts):
            # The same checks, in the same words, as the engine (pool_rows, placeholder_row, max_length).
            pieces = _PIECE.findall(p.text)
            if not pieces:
                raise ValueError("empty prompt")
            if self.max_length is not None and len(pieces) + 1 > self.max_length:
                raise ValueError(f"prompt of {len(pieces) + 1} tokens exceeds max_length {self.max_length}")
            start, stop = (len(pieces), len(pieces) + 1) if p.pool is None else pool_rows(self.tokenize, p.text, p.pool)
            rewrite = None
            if p.rewrite is not None:
                if p.pool is not None:
                    raise ValueError("token prepending reads the last token only, not pooled rows")
                row = placeholder_row(self.tokenize, p.text, p.rewrite.span)
                rewrite = (row, p.rewrite.start, p.rewrite.stop)
            for li, layer in enumerate(layers):
                out[li, k] = self._read(pieces, layer, start, stop, rewrite)
            if self.delay:
                time.sleep(self.delay)
            if progress:
                progress(1)  # one prompt done: what the engine's per-decode shares add up to
        return out

    def _read(
        self, pieces: list[str], layer: Read, start: int, stop: int, rewrite: tuple[int, int, int] | None
    ) -> np.ndarray:
        """The mean state of token rows [start, stop) at ``layer`` (row 0 is BOS, row i the i-th piece)."""
        # Row r's state: the mean of the vectors of pieces 1..r (the words so far) plus an order term
        # hashed from the whole text up to r. Causal by construction.
        bag = np.zeros(self.dim, dtype=np.float64)
        order = hashlib.blake2b(f"{self.seed}\x00{layer}".encode(), digest_size=16)
        total = np.zeros(self.dim, dtype=np.float64)
        for r in range(stop):
            if r > 0:
                piece = pieces[r - 1]
                bag += self._vector(layer, piece.strip() or piece)
                order.update(piece.encode("utf-8", "surrogatepass") + b"\x00")
            if r >= start:
                total += bag / max(r, 1) + 0.25 * _gaussian(order.copy().digest(), self.dim)
        state = total / (stop - start)
        if rewrite is not None:
            row, first, last = rewrite
            # Rewriting block inputs first..last-1 changes every later block's output and the final state.
            if first < last and top_block(layer, self.n_layer) > first:
                key = f"{self.seed}\x00{layer}\x00rewrite\x00{row}\x00{first}\x00{last}".encode()
                state = state + 0.25 * _gaussian(hashlib.blake2b(key, digest_size=16).digest(), self.dim)
        return state.astype(np.float32)

    def _vector(self, layer: Read, word: str) -> np.ndarray:
        """A word's own vector at a layer (its leading whitespace dropped: " cat" and "cat" agree)."""
        key = (layer, word)
        vec = self._memo.get(key)
        if vec is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            digest = hashlib.blake2b(f"{self.seed}\x00{layer}\x00{word}".encode("utf-8", "surrogatepass")).digest()
            vec = self._memo[key] = _gaussian(digest, self.dim)
        return vec


def _piece_id(piece: str) -> int:
    """A token id from the piece's bytes: the same in every process, never BOS or 0."""
    digest = hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return 2 + int.from_bytes(digest, "little") % (2**31 - 2)


def _gaussian(digest: bytes, dim: int) -> np.ndarray:
    """A standard normal vector (float64) seeded by ``digest``: numpy's PCG64 stream is stable across versions."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little"))).standard_normal(dim)


def write_model(
    path: str | Path,
    *,
    n_layer: int = 30,
    n_embd: int = 576,
    n_ctx: int = 8192,
    arch: str = "llama",
    name: str = "fake",
) -> Path:
    """A GGUF file of a few KB with a causal model's header (default: smollm2-135m's shape) and no real weights.

    What :func:`metaeol_edge.modelfile.inspect_gguf` and ``MetaEOL`` read of a
    model is all there; llama.cpp could not run it, and the fake backend never asks it to.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_uint32(f"{arch}.block_count", n_layer)
    writer.add_uint32(f"{arch}.embedding_length", n_embd)
    writer.add_uint32(f"{arch}.context_length", n_ctx)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)  # what the registry ships smollm2 at
    # One small tensor: a GGUF file with tensor data is what every reader of a model expects.
    writer.add_tensor("token_embd.weight", np.arange(4 * 8, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
