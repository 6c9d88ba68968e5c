"""The only module that talks to llama.cpp.

How a prompt's embedding is read (the final-norm state of its last token, which
is what llama.cpp's LAST pooling returns) without paying for every token:

* The context runs in logits mode (``embeddings=False``): a context with
  embeddings on makes llama.cpp mark every token as an output, so the final norm
  and the vocabulary head would run over the whole prompt.
* Only each sequence's last token is an output. The final-layer graph then
  keeps just those rows, and the context's eval callback copies the
  ``result_norm`` tensor (one row per output, in batch order) with
  ``ggml_backend_tensor_get``, which also works when the tensor lives on a GPU.
* Each template's fixed instruction is decoded once into a spare sequence and
  copied into the working sequence (``llama_memory_seq_cp``); only the longest
  common token prefix of the full prompt and the template prefix is shared, so a
  BPE merge at the boundary can never change a result. The KV cache is unified:
  partial copies abort on a non-unified cache.
* One prompt per decode, on a cache laid out the same way every time, so a
  prompt's vector is the same bit for bit whatever else is embedded with it.
* Once the callback has read every tensor asked for, it stops the graph: the
  vocabulary head (262k rows on Gemma 3, ~30% of a short decode) and any block
  above the highest layer asked for never run. llama.cpp then drops that
  ubatch from the KV cache, which is only allowed on a prompt's last run.
* Layers: the eval callback also copies the last row of ``l_out-N`` (block N+1's
  output); below the last block these hold every token of the ubatch, and a
  prompt's last token is the last row.
* Token Prepending (a prompt's ``rewrite``): the callback also asks for
  ``l_out-(k-1)`` of each block k to rewrite, so the scheduler stops there, and
  overwrites the placeholder's row with the last token's (:func:`copy_row`)
  before the next block reads it (its K/V, its residual). It needs the placeholder
  and the last token in one ubatch, and one prompt per decode.
* The KV cache is F32 by default. With llama.cpp's F16 cache, Gemma 3's vectors
  move by up to 0.003 in cosine depending only on how a prompt is split across
  decodes (so prefix sharing would change them); with F32 every split gives the
  same vector. Prompts are short, so the larger cache costs little.

The packed (throughput) mode, ``Engine(..., mode="packed")``, for devices where
one ~18-token decode per prompt leaves the hardware idle (a GPU):

* The call's distinct template prefixes (at most ``MAX_PREFIXES``; more are
  loaded a group at a time) are decoded once into sequences 0..15 and kept
  across calls. Each prompt of a pack gets a work sequence (16, 17, ...), its
  shared prefix copied in with ``llama_memory_seq_cp`` as above, and only its
  own tokens in the batch; each prompt's last token (or its span's rows) is an
  output. A pack holds up to ``pack`` prompts and ``n_batch`` tokens, in one
  decode and one ubatch; every prompt of a pack ends in it, so the graph may
  stop early as above, and the work sequences are removed after it.
* Alignment (``align``, 16 by default): every prefix and every prompt starts on
  a KV cell that is a multiple of ``align`` (pad tokens in sequences of their
  own fill the gaps, and a pack's length is a multiple of ``align``; no prompt
  attends to them), and a prompt shares a multiple of ``align`` tokens of its
  prefix. Attention sums a prompt's KV cells in SIMD blocks, so its cells then
  fall into the same lanes as when it is decoded whole and alone on an empty
  cache, and the other sequences' masked cells add exact zeros: a vector does
  not depend on what it is packed with (tests/test_packed.py measures it).
  ``align=1`` packs tightly (fewer tokens, no such guarantee).
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaeol_edge.backends import snapshots
from metaeol_edge.backends.snapshots import PrefixSnapshots, state_key
from metaeol_edge.backends.tensors import ATTN_OUT, GGML_TYPE_F32, RESULT_NORM, _Ggml, _tensor_names, copy_row
from metaeol_edge.errors import ModelError
from metaeol_edge.llamacpp import _llama, default_threads, init_backend, model_params
from metaeol_edge.methods.layers import FINAL, Read, check_resolved, top_block
from metaeol_edge.models.modelfile import GGUFInfo, inspect_gguf

PREFIX_SEQ = 0
WORK_SEQ = 1
ENGINE_MODES = ("one-at-a-time", "packed")
MAX_PREFIXES = 16  # packed mode: template prefixes held at once, in sequences 0..15
PAD_SEQS = 2  # packed mode: pad tokens of the prefix area (kept) and of a pack (removed with it)
ONE_AT_A_TIME = "one-at-a-time"
DECODE_ABORTED = 2  # llama_decode's code when the eval callback stops the graph
LANE_CHUNK = 8  # prompts a lane takes from the queue at a time


def lane_plan(mode: str, n_threads: int | None, lanes: int | None) -> tuple[int, int]:
    """(lanes, threads per lane).

    One-at-a-time with neither set: one single-thread lane per usable core
    (benchmarks/speed.py measures it against threads, idle and beside busy
    processes). ``n_threads`` alone keeps 0.2's one context with that many
    threads; ``lanes`` alone shares the cores among the lanes. Packed mode is one
    context (its decodes are large enough to split among threads).
    """
    if lanes is not None and (not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1):
        raise ValueError(f"lanes must be a whole number >= 1, not {lanes!r}")
    if n_threads is not None and (not isinstance(n_threads, int) or isinstance(n_threads, bool) or n_threads < 1):
        raise ValueError(f"n_threads must be a whole number >= 1, not {n_threads!r}")
    if mode != ONE_AT_A_TIME:
        if lanes not in (None, 1):
            raise ValueError(f"lanes apply to the {ONE_AT_A_TIME!r} engine mode, not {mode!r}")
        return 1, n_threads or default_threads()
    if lanes is None:
        return (1, n_threads) if n_threads is not None else (default_threads(), 1)
    return lanes, n_threads or max(1, default_threads() // lanes)


@dataclass
class Prompt:
    """One prompt for the engine: its tokens, a template prefix it may share, and what to read.

    ``rows``: token positions ``[start, stop)`` whose states are averaged; None
    reads the last token alone. ``rewrite``: (row, start, stop), Token
    Prepending: for each block k in ``[start, stop)``, block k's output row
    ``row`` becomes the last token's row (see :class:`metaeol_edge.methods.Rewrite`).
    """

    tokens: Sequence[int]
    prefix: Sequence[int] | None = None
    rows: tuple[int, int] | None = None
    rewrite: tuple[int, int, int] | None = None


class Engine:
    """A llama.cpp model and one context, driven through the low-level API."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        max_length: int = 512,
        kv_f32: bool = True,
        verbose: bool = False,
        mode: str = "one-at-a-time",
        pack: int | None = None,
        align: int = 16,
        lanes: int | None = None,
        _shared: Engine | None = None,
    ) -> None:
        """``mode``: ``"one-at-a-time"`` (one prompt per decode) or ``"packed"`` (up to
        ``pack`` prompts, default ``n_batch // 8``, and ``n_batch`` tokens per decode,
        each prompt starting on a KV cell that is a multiple of ``align``).

        ``lanes``: one-at-a-time contexts over the one loaded model, each with
        ``n_threads`` threads, that take a call's prompts from a shared queue in
        parallel (see :func:`lane_plan` for the default). ``_shared``: the engine
        whose model a lane uses (internal)."""
        check_engine_options(mode, align, pack)
        lanes, n_threads = lane_plan(mode, n_threads, lanes)
        self.info: GGUFInfo = inspect_gguf(model_path) if _shared is None else _shared.info
        lc = _llama()
        init_backend(verbose)
        self._lc = lc
        self._ggml = _Ggml()
        self.model_path = Path(model_path)
        self.max_length = max_length
        self.n_batch = max(n_batch, 32)
        self.n_threads = n_threads  # per lane
        self.mode = mode
        self.align = align if mode == "packed" else 1
        # Sequence ids: prefixes, one per prompt of a pack, then the two pad sequences (llama.cpp's cap is 256).
        max_seq = lc.llama_max_parallel_sequences() if hasattr(lc, "llama_max_parallel_sequences") else 256
        self.pack = min(pack or max(1, self.n_batch // 8), max_seq - MAX_PREFIXES - PAD_SEQS)
        self._pad_prefix_seq = MAX_PREFIXES + self.pack  # pads between prefixes: kept with them
        self._pad_work_seq = self._pad_prefix_seq + 1  # pads inside a pack: removed after it
        # Packed: room for the prefixes (one of max_length at least, each aligned) beside a pack or a
        # whole max_length prompt.
        self._prefix_room = max_length + MAX_PREFIXES * self.align

        self._owns_model = _shared is None
        if _shared is None:
            self.model = lc.llama_model_load_from_file(str(self.model_path).encode(), model_params(n_gpu_layers))
        else:
            self.model = _shared.model  # llama.cpp shares one model's weights among contexts
        if not self.model:
            raise ModelError(f"llama.cpp could not load {self.model_path} (unsupported architecture or damaged file)")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_layer = lc.llama_model_n_layer(self.model)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.model)

        self._wanted: dict[bytes, int] = {RESULT_NORM: 0}  # tensor name -> slot in _rows
        self._rows: list[np.ndarray | None] = [None]
        # What the callback reads in this decode: (rows among all tokens, the same rows
        # among the outputs, tokens in the ubatch), or None.
        self._read: tuple[np.ndarray, np.ndarray, int] | None = None
        self._n_read = 0
        self._may_stop = False
        self._callback_error: BaseException | None = None
        # Token Prepending: tensor names to rewrite in this decode, (placeholder row, last row), those done.
        self._rewrite_names: frozenset[bytes] = frozenset()
        self._rewrite_rows: tuple[int, int] | None = None
        self._rewritten: set[bytes] = set()
        self._cb = lc.ggml_backend_sched_eval_callback(self._eval_callback)

        cparams = lc.llama_context_default_params()
        if mode == "packed":
            cparams.n_ctx = self._prefix_room + max(self.n_batch, max_length) + self.align
            cparams.n_seq_max = MAX_PREFIXES + self.pack + PAD_SEQS
            # A sliding-window model (Gemma 3) gets a window cache of n_swa + n_ubatch cells by
            # default, too few for the prefixes beside a pack: make it as big as the main one.
            cparams.swa_full = True
        else:
            cparams.n_ctx = 2 * max_length  # room for any template prefix beside a full-length prompt
            cparams.n_seq_max = 2  # PREFIX_SEQ and WORK_SEQ
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch  # one ubatch per decode: one callback, rows in batch order
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.embeddings = False
        # A unified cache: a partial seq_cp aborts the process on a non-unified one.
        cparams.kv_unified = True
        # As Llama() does; AUTO turns flash attention on for the CPU, which rounds Q to F16.
        cparams.flash_attn_type = 0
        cparams.no_perf = True
        if kv_f32:
            cparams.type_k = cparams.type_v = GGML_TYPE_F32
        cparams.cb_eval = self._cb
        cparams.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            if self._owns_model:
                lc.llama_model_free(self.model)
            self.model = None
            raise ModelError(f"llama.cpp could not create a context for {self.model_path}")
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._threads_now = n_threads
        self._prefix: tuple[int, ...] = ()  # the template prefix now in PREFIX_SEQ
        # Packed: the template prefixes now in sequences 0.., and the first cell after them.
        self._loaded: dict[tuple[int, ...], int] = {}
        self._work_start = 0
        self._decoded = 0  # every token this context decoded, pads included
        # One-at-a-time: template prefixes decoded once, then copied in (the process's store, shared with the
        # lanes and with other engines on this file and these settings).
        self._snapshots: PrefixSnapshots = snapshots.SHARED if _shared is None else _shared._snapshots
        if _shared is None:
            self._state_key = state_key(
                self.model_path, kv_f32=kv_f32, n_batch=self.n_batch, n_ctx=self.n_ctx, gpu=n_gpu_layers, mode=mode
            )
        else:
            self._state_key = _shared._state_key
        self._restored = 0  # prefixes this context copied in instead of decoding
        self._lanes: list[Engine] = [self]
        try:
            for _ in range(lanes - 1):
                self._lanes.append(
                    Engine(
                        model_path,
                        n_gpu_layers=n_gpu_layers,
                        n_threads=n_threads,
                        n_batch=n_batch,
                        max_length=max_length,
                        kv_f32=kv_f32,
                        verbose=verbose,
                        lanes=1,
                        _shared=self,
                    )
                )
        except BaseException:
            self.close()
            raise

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def tokens_decoded(self) -> int:
        """Every token decoded by this engine's contexts, pads included."""
        return sum(lane._decoded for lane in self._lanes)

    @property
    def prefixes_restored(self) -> int:
        """Template prefixes this engine's contexts copied from a saved state instead of decoding."""
        return sum(lane._restored for lane in self._lanes)

    # -- tokens -------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenize as ``Llama.embed`` does (BOS where the model wants it, no special-token parsing)."""
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self._lc.llama_token * n_max)()
        n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:
            buf = (self._lc.llama_token * -n)()
            n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, False)
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        n_max = len(tokens) * 32 + 16
        buf = ctypes.create_string_buffer(n_max)
        arr = (self._lc.llama_token * len(tokens))(*tokens)
        n = self._lc.llama_detokenize(self.vocab, arr, len(tokens), buf, n_max, False, False)
        return buf.raw[: max(n, 0)].decode("utf-8", "ignore")

    # -- eval callback --------------------------------------------------------

    def _eval_callback(self, tensor: int, ask: bool, user_data: int) -> bool:
        """Copy out the rows to read of each wanted tensor.

        ``result_norm`` and the last block's ``l_out`` hold only the output
        rows (the tokens marked as outputs, in batch order); the other blocks'
        ``l_out`` hold every token of the ubatch, in batch order. The shape
        tells which, and the rows to read are then outputs or tokens.
        """
        try:
            name = self._ggml.lib.ggml_get_name(tensor)
            slot = self._wanted.get(name)
            if ask:
                return slot is not None or name in self._rewrite_names
            if self._rewrite_rows is not None and name in self._rewrite_names:
                # Before the read: as in the authors' code, a block's state is read after its rewrite.
                n_tokens = self._read[2] if self._read is not None else self._rewrite_rows[1] + 1
                copy_row(self._ggml, tensor, self._rewrite_rows[1], self._rewrite_rows[0], self.n_embd, n_tokens)
                self._rewritten.add(name)
            if slot is None or self._read is None:
                return True
            type_, ne0, ne1 = self._ggml.shape(tensor)
            nbytes = self._ggml.lib.ggml_nbytes(tensor)
            if type_ != GGML_TYPE_F32 or ne0 != self.n_embd or ne1 < 1 or nbytes != ne0 * ne1 * 4:
                raise RuntimeError(f"unexpected {name.decode()} tensor: type {type_}, shape ({ne0}, {ne1})")
            tokens, outputs, n_tokens = self._read
            idx = tokens if ne1 == n_tokens else outputs
            first, stop = int(idx[0]), int(idx[-1]) + 1  # idx is increasing: copy the span, then pick
            if stop > ne1:
                raise RuntimeError(f"{name.decode()} has {ne1} rows, {stop} needed")
            rows = np.empty((stop - first, ne0), dtype=np.float32)
            self._ggml.lib.ggml_backend_tensor_get(tensor, rows.ctypes.data, first * ne0 * 4, rows.nbytes)
            if len(idx) != stop - first:  # packed: rows of several sequences, with others between
                rows = rows[idx - first]
            if self._rows[slot] is None:
                self._n_read += 1
            self._rows[slot] = rows
        except BaseException as exc:  # never let an exception cross the C boundary
            self._callback_error = exc
            return False
        # Once every wanted tensor is read, stop the graph: the vocabulary head (and
        # any block above the highest layer asked for) is never computed.
        return not (self._may_stop and self._n_read == len(self._wanted))

    # -- decoding ------------------------------------------------------------

    def _decode(
        self, seq: int, pos0: int, tokens: Sequence[int], read: tuple[int, int] | None, last: bool
    ) -> list[np.ndarray] | None:
        """Decode one run of a sequence; with ``read`` = (first, count) token positions of this run,
        return each wanted tensor's rows for them. ``last``: the prompt's last run (it may stop early)."""
        n = len(tokens)
        rows = None if read is None else np.arange(read[0], read[0] + read[1])
        return self._run(tokens, range(pos0, pos0 + n), [seq] * n, rows, last)

    def _run(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[int],
        read: np.ndarray | None,
        last: bool,
    ) -> list[np.ndarray] | None:
        """Decode one batch; the tokens at the (increasing) batch indices ``read`` are its outputs,
        and each wanted tensor's rows for them are returned, in that order. ``last``: every sequence
        read ends in this batch (the graph may stop early)."""
        b = self.batch
        n = len(tokens)
        outputs = np.zeros(n, dtype=bool)
        if read is not None:
            outputs[read] = True
        # llama.cpp needs one output per batch; a row nobody reads is simply dropped.
        outputs[n - 1] = True
        for j in range(n):
            b.token[j] = tokens[j]
            b.pos[j] = positions[j]
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seqs[j]
            b.logits[j] = int(outputs[j])
        b.n_tokens = n
        # Rows of the read tokens among all tokens, and among the outputs (in batch order).
        self._read = None
        if read is not None and len(read):
            self._read = (read, np.cumsum(outputs)[read] - 1, n)
        self._rows = [None] * len(self._wanted)
        self._callback_error = None
        self._n_read = 0
        # Stopping early makes llama.cpp drop this ubatch from the KV cache, which is
        # what a prompt's last run wants (it is removed after) and a prefix must not.
        self._may_stop = last and self._read is not None
        rc = self._lc.llama_decode(self.ctx, b)
        if self._callback_error is not None:
            raise RuntimeError("reading a hidden state failed") from self._callback_error
        if rc == DECODE_ABORTED and self._may_stop and self._n_read == len(self._wanted):
            rc = 0
        if rc != 0:
            raise RuntimeError(
                f"llama_decode failed with code {rc} ({n} tokens, KV cache of {self.n_ctx}): "
                + ("no room in the KV cache" if rc == 1 else "see llama.cpp's log")
            )
        self._decoded += n
        if self._read is None:
            return None
        missing = [name.decode() for name, slot in self._wanted.items() if self._rows[slot] is None]
        missing += sorted(name.decode() for name in self._rewrite_names - self._rewritten)
        if missing:
            spans = ""
            if any(m.startswith(ATTN_OUT) for m in missing):
                spans = " (an attention span reads attn_out tensors, which this architecture's graph does not name; "
                spans += "the pytorch backend reads self_attn's output)"
            raise ModelError(f"llama.cpp's graph for this model has no tensor {', '.join(missing)}{spans}")
        return self._rows  # type: ignore[return-value]

    def embed(
        self,
        prompts: Sequence[Prompt],
        progress: Callable[[float], None] | None = None,
        layers: Sequence[Read] | None = None,
    ) -> np.ndarray:
        """Hidden state of each prompt's last token (or the mean over its ``rows``).

        ``progress`` is called with the share of a prompt done, after each decode.

        Without ``layers``: the final-norm state, shape (len(prompts), n_embd).
        With ``layers`` (``FINAL`` or block numbers 1..n_layer, see
        :func:`metaeol_edge.layers.resolve_layer`): shape (len(layers),
        len(prompts), n_embd), all read in the same pass.

        Each prompt's result depends on its own tokens only, bit for bit, whatever
        else is in the call: prompts run one per decode, grouped by template, on a
        cache that holds just their template's prefix (decoded on an empty cache),
        so the KV cells, their count and every kernel's shape are the same each time.
        That is what lets the embedding cache mix stored and fresh vectors.
        """
        wanted = [FINAL] if layers is None else list(layers)
        check_resolved(wanted, self.n_layer)
        out = np.empty((len(wanted), len(prompts), self.n_embd), dtype=np.float32)
        for p in prompts:
            if not p.tokens:
                raise ValueError("empty prompt")
            if len(p.tokens) > self.max_length:
                raise ValueError(f"prompt of {len(p.tokens)} tokens exceeds max_length {self.max_length}")
            if p.rows is not None and not 0 <= p.rows[0] < p.rows[1] <= len(p.tokens):
                raise ValueError(f"rows {p.rows} to read lie outside a prompt of {len(p.tokens)} tokens")
            if p.rewrite is not None:
                self._check_rewrite(p)
        if self.mode == "packed":
            slots = self._want(wanted)
            self._embed_packed(prompts, slots, out, progress)
            return out[0] if layers is None else out
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p.prefix or ()), []).append(i)
        if self.lanes == 1 or len(prompts) == 1:
            # One prompt: one lane with every lane's threads (a vector does not depend on the thread count).
            self._set_threads(self.n_threads * self.lanes)
            try:
                # Start with the prefix the cache already holds: one prefix decode fewer.
                work = sorted(groups.items(), key=lambda g: g[0] != self._prefix)
                self._embed_groups(prompts, work, wanted, out, progress)
            finally:
                self._set_threads(self.n_threads)
        else:
            self._embed_lanes(prompts, groups, wanted, out, progress)
        return out[0] if layers is None else out

    def _want(self, wanted: Sequence[Read]) -> list[list[int]]:
        """Ask the callback for the reads ``wanted``; return each one's slots among the rows it reads (one for a
        layer, one per block for an attention span, whose rows are averaged)."""
        names = list(dict.fromkeys(name for layer in wanted for name in _tensor_names(layer)))
        self._wanted = {name: slot for slot, name in enumerate(names)}
        return [[self._wanted[name] for name in _tensor_names(layer)] for layer in wanted]

    def _set_threads(self, n: int) -> None:
        if n != self._threads_now:
            self._lc.llama_set_n_threads(self.ctx, n, n)
            self._threads_now = n

    def _embed_groups(
        self,
        prompts: Sequence[Prompt],
        work: Sequence[tuple[tuple[int, ...], Sequence[int]]],
        wanted: Sequence[Read],
        out: np.ndarray,
        progress: Callable[[float], None] | None,
    ) -> None:
        """One prompt per decode on this context: for each (prefix, prompt indices), load the prefix
        and fill ``out`` (layers, prompts, dim) at those indices."""
        slots = self._want(wanted)
        for prefix, members in work:
            self._load_prefix(prefix)
            for i in members:
                rows = self._embed_one(
                    prompts[i].tokens, prefix, prompts[i].rows, progress, rewrite=prompts[i].rewrite, layers=wanted
                )
                for li, read_slots in enumerate(slots):
                    out[li, i] = _read_value(rows, read_slots)

    def _embed_lanes(
        self,
        prompts: Sequence[Prompt],
        groups: dict[tuple[int, ...], list[int]],
        wanted: Sequence[Read],
        out: np.ndarray,
        progress: Callable[[float], None] | None,
    ) -> None:
        """Every lane takes chunks of one prefix's prompts from a shared queue until none are left.

        Why lanes: on a small CPU a decode is ~18 tokens, too little work to split
        among threads that wait for each other after every op, and one thread
        descheduled by another process stalls them all. A lane is a context of its
        own, so lanes never wait for each other, and a lane slowed by other work on
        its core just takes fewer chunks. A lane keeps to the prefix it holds while
        that prefix has chunks left (each prefix is decoded by few lanes). A prompt's
        vector is the same bit for bit in any lane (see :meth:`embed`).
        """
        size = max(1, min(LANE_CHUNK, -(-max(len(m) for m in groups.values()) // (2 * self.lanes))))
        queue = {
            prefix: deque(members[i : i + size] for i in range(0, len(members), size))
            for prefix, members in groups.items()
        }
        lock = threading.Lock()
        errors: list[BaseException] = []

        def locked_progress(done: float) -> None:
            assert progress is not None
            with lock:
                progress(done)

        def work(lane: Engine) -> None:
            try:
                while True:
                    with lock:
                        if errors or not queue:
                            return
                        prefix = lane._prefix if lane._prefix in queue else max(queue, key=lambda k: len(queue[k]))
                        chunk = queue[prefix].popleft()
                        if not queue[prefix]:
                            del queue[prefix]
                    lane._embed_groups(prompts, [(prefix, chunk)], wanted, out, progress and locked_progress)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=work, args=(lane,), daemon=True) for lane in self._lanes[1:]]
        for t in threads:
            t.start()
        work(self)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _load_prefix(self, prefix: tuple[int, ...]) -> None:
        """Empty the cache and decode a template prefix into PREFIX_SEQ (no-op if already there)."""
        if prefix == self._prefix:
            return
        self._lc.llama_memory_clear(self.mem, False)
        self._prefix = ()
        if not prefix:
            return
        key = (self._state_key, prefix)
        saved = self._snapshots.get(key)
        if saved is not None:
            # Into the empty cache, the saved cells land where a decode puts them, with its bytes.
            if self._lc.llama_state_seq_set_data(self.ctx, saved, ctypes.sizeof(saved), PREFIX_SEQ):
                self._restored += 1
                self._prefix = prefix
                return
            self._snapshots.drop(key)  # not this context's shape after all: decode it
            self._lc.llama_memory_clear(self.mem, False)
        # The last token is an output only so the batch has one; its row is dropped.
        for start in range(0, len(prefix), self.n_batch):
            self._decode(PREFIX_SEQ, start, prefix[start : start + self.n_batch], read=None, last=False)
        self._prefix = prefix
        size = self._lc.llama_state_seq_get_size(self.ctx, PREFIX_SEQ)
        if 0 < size <= self._snapshots.limit:
            data = (ctypes.c_uint8 * size)()
            if self._lc.llama_state_seq_get_data(self.ctx, data, size, PREFIX_SEQ) == size:
                self._snapshots.put(key, data)

    def _shared(self, tokens: Sequence[int], prefix: Sequence[int], start_row: int) -> int:
        """How many of a prompt's first tokens come from its template prefix's sequence.

        Only the longest common token prefix: a BPE merge across the
        template/sentence boundary then changes nothing. Every row read must be
        decoded, and so must the last token, to be an output. Packed: a multiple
        of ``align``, so the prompt's own cells line up as when it runs whole."""
        shared = min(_common_prefix(tokens, prefix), len(tokens) - 1, start_row)
        return shared - shared % self.align

    def _embed_one(
        self,
        tokens: Sequence[int],
        prefix: tuple[int, ...],
        rows: tuple[int, int] | None,
        progress: Callable[[float], None] | None = None,
        prefix_seq: int = PREFIX_SEQ,
        work_seq: int = WORK_SEQ,
        rewrite: tuple[int, int, int] | None = None,
        layers: Sequence[Read] = (FINAL,),
    ) -> list[np.ndarray]:
        """Each wanted tensor's rows (the last token's, or ``rows``) of one prompt.

        ``progress`` gets this prompt's share done after each decode (1.0 in all),
        so a long prompt moves a progress bar while it runs."""
        start_row, stop_row = rows if rows is not None else (len(tokens) - 1, len(tokens))
        shared = self._shared(tokens, prefix, start_row)
        if rewrite is not None:
            shared = min(shared, rewrite[0])  # the placeholder is decoded with the last token
            self._arm_rewrite(rewrite, shared, len(tokens), layers)
        step = self.n_batch - self.n_batch % self.align  # chunks keep the next one's cells aligned
        self._lc.llama_memory_seq_rm(self.mem, work_seq, -1, -1)
        try:
            if shared:
                self._lc.llama_memory_seq_cp(self.mem, prefix_seq, work_seq, 0, shared)
            parts: list[list[np.ndarray]] = []
            for start in range(shared, len(tokens), step):
                chunk = tokens[start : start + step]
                lo, hi = max(start_row, start), min(stop_row, start + len(chunk))
                read = (lo - start, hi - lo) if lo < hi else None
                got = self._decode(work_seq, start, chunk, read, last=start + len(chunk) == len(tokens))
                if got is not None:
                    parts.append(got)
                if progress:
                    progress(len(chunk) / (len(tokens) - shared))
            assert parts
            if len(parts) == 1:
                return parts[0]
            return [np.concatenate([p[slot] for p in parts]) for slot in range(len(self._wanted))]
        finally:
            self._rewrite_names, self._rewrite_rows = frozenset(), None
            self._lc.llama_memory_seq_rm(self.mem, work_seq, -1, -1)

    # -- packed mode -----------------------------------------------------------

    def _aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def _prefix_groups(self, prefixes: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """The call's distinct prefixes in groups that fit the prefix area together (at most
        MAX_PREFIXES, ``_prefix_room`` cells), the group already loaded first."""
        held = [p for p in prefixes if p in self._loaded]
        groups = [list(self._loaded)] if held else []
        current: list[tuple[int, ...]] = []
        used = 0
        for p in prefixes:
            if p in self._loaded:
                continue
            size = self._aligned(min(len(p), self.max_length))
            if current and (len(current) == MAX_PREFIXES or used + size > self._prefix_room):
                groups.append(current)
                current, used = [], 0
            current.append(p)
            used += size
        if current:
            groups.append(current)
        return groups

    def _load_prefixes(self, group: list[tuple[int, ...]]) -> None:
        """Empty the cache and decode the prefixes into sequences 0.., each from an aligned cell."""
        if list(self._loaded) == group:
            return
        self._lc.llama_memory_clear(self.mem, False)
        self._loaded, self._work_start = {}, 0
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        pad, pad_pos = self._pad_token(), 0
        for seq, prefix in enumerate(group):
            tokens += prefix
            positions += range(len(prefix))
            seqs += [seq] * len(prefix)
            gap = self._aligned(len(tokens)) - len(tokens)
            tokens += [pad] * gap
            positions += range(pad_pos, pad_pos + gap)  # the pad sequence's positions just count up
            seqs += [self._pad_prefix_seq] * gap
            pad_pos += gap
        # Decoded on an empty cache from cell 0, so each prefix's first cell is its offset here.
        for start in range(0, len(tokens), self.n_batch):
            stop = start + self.n_batch
            self._run(tokens[start:stop], positions[start:stop], seqs[start:stop], None, last=False)
        self._loaded = {prefix: seq for seq, prefix in enumerate(group)}
        self._work_start = len(tokens)

    def _pad_token(self) -> int:
        """What fills alignment gaps: any valid token does (no prompt attends to it); BOS, else 0."""
        bos = self._lc.llama_vocab_bos(self.vocab)
        return bos if bos >= 0 else 0

    def _embed_packed(
        self,
        prompts: Sequence[Prompt],
        slots: list[list[int]],
        out: np.ndarray,
        progress: Callable[[float], None] | None,
    ) -> None:
        """Fill ``out`` (layers, prompts, dim): prompts packed into decodes, a prefix group at a time."""
        keys = [tuple(p.prefix or ())[: self.max_length] for p in prompts]
        prefixes = list(dict.fromkeys(k for k in keys if k))
        done = np.zeros(len(prompts), dtype=bool)
        for group in self._prefix_groups(prefixes) or [None]:
            if group is not None:
                self._load_prefixes(group)
            # A prompt without a prefix runs beside whatever prefixes are held.
            members = [i for i, k in enumerate(keys) if not done[i] and (not k or k in self._loaded)]
            pack: list[int] = []
            size = 0
            for i in members:
                n = self._aligned(len(prompts[i].tokens) - self._shared_of(prompts[i], keys[i]))
                if n > self.n_batch:  # longer than a decode: alone, in chunks
                    seq = self._loaded.get(keys[i], PREFIX_SEQ)
                    rows = self._embed_one(prompts[i].tokens, keys[i], prompts[i].rows, progress, seq, MAX_PREFIXES)
                    self._store(out, slots, [i], [rows])
                    continue
                if pack and (len(pack) == self.pack or size + n > self.n_batch):
                    self._run_pack(prompts, keys, pack, slots, out, progress)
                    pack, size = [], 0
                pack.append(i)
                size += n
            if pack:
                self._run_pack(prompts, keys, pack, slots, out, progress)
            done[members] = True

    def _shared_of(self, p: Prompt, key: tuple[int, ...]) -> int:
        start_row = p.rows[0] if p.rows is not None else len(p.tokens) - 1
        return self._shared(p.tokens, key, start_row) if key else 0

    def _run_pack(
        self,
        prompts: Sequence[Prompt],
        keys: list[tuple[int, ...]],
        pack: list[int],
        slots: list[list[int]],
        out: np.ndarray,
        progress: Callable[[float], None] | None,
    ) -> None:
        """Decode the prompts ``pack`` (indices into ``prompts``) together, one work sequence each."""
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        read: list[int] = []
        counts: list[int] = []
        pad, pad_pos = self._pad_token(), 0
        try:
            for k, i in enumerate(pack):
                p, seq = prompts[i], MAX_PREFIXES + k
                shared = self._shared_of(p, keys[i])
                if shared:
                    self._lc.llama_memory_seq_cp(self.mem, self._loaded[keys[i]], seq, 0, shared)
                start_row, stop_row = p.rows if p.rows is not None else (len(p.tokens) - 1, len(p.tokens))
                base = len(tokens) - shared  # batch index of the prompt's token 0
                read += range(base + start_row, base + stop_row)
                counts.append(stop_row - start_row)
                tokens += p.tokens[shared:]
                positions += range(shared, len(p.tokens))
                seqs += [seq] * (len(p.tokens) - shared)
                gap = self._aligned(len(tokens)) - len(tokens)  # the next prompt starts on an aligned cell
                tokens += [pad] * gap
                positions += range(pad_pos, pad_pos + gap)
                seqs += [self._pad_work_seq] * gap
                pad_pos += gap
            # The pack starts on an aligned cell: the work area is empty and begins after the prefixes.
            got = self._run(tokens, positions, seqs, np.asarray(read), last=True)
        finally:
            for k in range(len(pack)):
                self._lc.llama_memory_seq_rm(self.mem, MAX_PREFIXES + k, -1, -1)
            self._lc.llama_memory_seq_rm(self.mem, self._pad_work_seq, -1, -1)
        assert got is not None
        bounds = np.cumsum([0, *counts])
        parts = [[rows[bounds[k] : bounds[k + 1]] for rows in got] for k in range(len(pack))]
        self._store(out, slots, pack, parts)
        if progress:
            progress(len(pack))

    @staticmethod
    def _store(out: np.ndarray, slots: list[list[int]], indices: list[int], parts: list[list[np.ndarray]]) -> None:
        """Each prompt's read row (or the mean of its span's rows) at each layer asked for."""
        for i, rows in zip(indices, parts, strict=True):
            for li, read_slots in enumerate(slots):
                out[li, i] = _read_value(rows, read_slots)

    # -- Token Prepending ------------------------------------------------------

    def _check_rewrite(self, p: Prompt) -> None:
        """Refuse a rewrite this engine cannot do exactly, before anything runs."""
        assert p.rewrite is not None
        row, start, stop = p.rewrite
        if self.mode != ONE_AT_A_TIME:
            raise ValueError(
                f"token prepending needs the {ONE_AT_A_TIME!r} engine mode (one prompt per decode), not {self.mode!r}"
            )
        if p.rows is not None:
            raise ValueError("token prepending reads the last token only, not pooled rows")
        if not 0 <= row < len(p.tokens) - 1:
            raise ValueError(f"placeholder row {row} is not before the last token of a {len(p.tokens)}-token prompt")
        if not 1 <= start <= stop:
            raise ValueError(f"rewrite layers {start}:{stop} must satisfy 1 <= start <= stop")
        if len(p.tokens) - row > self.n_batch:
            raise ValueError(
                f"token prepending needs the placeholder and the last token in one ubatch: {len(p.tokens) - row} "
                f"tokens from the placeholder on, over n_batch {self.n_batch} (raise n_batch or shorten the sentence)"
            )

    def _arm_rewrite(self, rewrite: tuple[int, int, int], shared: int, n_tokens: int, layers: Sequence[Read]) -> None:
        """Ask the callback to rewrite block outputs ``start..stop-1`` in the next decode (the prompt's only one).

        Blocks at or above the highest read one change nothing read, and the
        last block's output holds the output rows only: neither is rewritten.
        """
        row, start, stop = rewrite
        top = max(top_block(layer, self.n_layer) for layer in layers)
        if n_tokens - shared > self.n_batch:
            raise ValueError(f"token prepending: {n_tokens - shared} tokens to decode, over n_batch {self.n_batch}")
        self._rewrite_names = frozenset(f"l_out-{k - 1}".encode() for k in range(start, min(stop, top, self.n_layer)))
        self._rewrite_rows = (row - shared, n_tokens - 1 - shared)
        self._rewritten = set()

    def close(self) -> None:
        lc = self._lc
        for lane in getattr(self, "_lanes", [])[1:]:
            lane.close()
        if getattr(self, "batch", None) is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            if self._owns_model:
                lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _read_value(rows: list[np.ndarray], slots: list[int]) -> np.ndarray:
    """One read of one prompt: its token row (or the mean of its span's rows) of one tensor, or for an attention
    span the mean of its blocks' tensors."""
    values = [rows[slot] for slot in slots]
    if len(values) == 1 and len(values[0]) == 1:  # one row is copied as it is: why compute a mean of one
        return values[0][0]
    return np.mean([v.mean(axis=0, dtype=np.float32) for v in values], axis=0, dtype=np.float32)


def check_engine_options(mode: str, align: int, pack: int | None = None) -> None:
    """Refuse an unknown mode or a meaningless alignment or pack size, naming what is allowed."""
    if mode not in ENGINE_MODES:
        raise ValueError(f"engine mode must be one of {', '.join(ENGINE_MODES)}, not {mode!r}")
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f"align must be a whole number of tokens >= 1, not {align!r}")
    if pack is not None and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
        raise ValueError(f"pack must be a number of prompts >= 1, not {pack!r}")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
