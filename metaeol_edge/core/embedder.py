"""The recipe, written once, and ``MetaEOL``, what users call.

:class:`Embedder` streams sentences through a method, a backend, the cache and
post-processing: clean each sentence, pre-process it, cut it to fit
``max_length``, let the method make its prompts, take each prompt's state from
the cache or the backend, combine, post-process, normalize. Memory is bounded by
``batch_size`` sentences, not by the input. One object may be used from several
threads at once: the backend is serialised by a lock, the cache keeps a
connection per thread, and per-call statistics go to the caller
(:class:`EncodeStats`), never onto the object.

:class:`MetaEOL` is the recipe over a GGUF model (a registry id or a path), the
llama.cpp engine by default, the embedding cache and stored post-processing fits.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metaeol_edge.backends import Backend, open_backend, spec_for
from metaeol_edge.backends import choice as backend_choice
from metaeol_edge.backends.engine import check_engine_options
from metaeol_edge.core import identity
from metaeol_edge.core import postprocess as pp
from metaeol_edge.core.cache import EmbeddingCache
from metaeol_edge.core.config import EmbedConfig
from metaeol_edge.core.identity import CacheKey
from metaeol_edge.core.presets import Preset, get_preset
from metaeol_edge.errors import InputError, ModelError, kind_of
from metaeol_edge.methods import Method, make_method
from metaeol_edge.methods.layers import FINAL, LayerSpec, Read, early_exit_blocks, resolve_layers
from metaeol_edge.methods.prompts import TemplateSet, load_templates, preprocess
from metaeol_edge.models import digest, quantization, registry, resolve, store
from metaeol_edge.models.modelfile import inspect_gguf, truncate_gguf

COMBINE_NEEDS_LAYERS = "combine_layers averages several layers: give two or more, e.g. layer=[29, 24]"
COMBINE_NO_FIT = "combine_layers averages raw vectors; post-processing is fitted per layer and cannot follow it"


@dataclass(frozen=True)
class Truncation:
    """A sentence cut to fit ``max_length``: its index in the call, its tokens before and after."""

    index: int
    tokens: int
    kept: int


@dataclass
class EncodeStats:
    """What one call did; pass one to ``encode``/``encode_iter`` to have it filled."""

    sentences: int = 0
    hits: int = 0  # prompt vectors read from the cache
    misses: int = 0  # prompt vectors computed
    damaged: int = 0  # cached vectors that failed their checksum (recomputed, counted in misses)
    truncated: list[Truncation] = field(default_factory=list)


class Embedder:
    """The recipe over a backend. Subclasses say how the backend is made and what names a vector."""

    def __init__(
        self,
        method: Method,
        layers: tuple[int, ...],
        multi: bool,
        dim: int,
        *,
        label: str,
        preprocess: bool = True,
        max_length: int = 512,
        truncate: bool = True,
        cache: EmbeddingCache | None = None,
        cache_dtype: str = "float32",
        truncate_dim: int | None = None,
        combine_layers: bool = False,  # checked by MetaEOL before its cache opens (two layers or more)
    ) -> None:
        if cache_dtype not in ("float32", "float16"):
            raise ValueError("cache_dtype must be 'float32' or 'float16'")
        if not isinstance(max_length, int) or max_length < 16:
            raise ValueError("max_length must be at least 16 tokens")
        self.method = method
        self.layers = layers
        self.layer = layers[0]
        self.combine_layers = combine_layers
        self._multi = multi and not combine_layers  # whether encode gives a list, one array per layer
        self._dim = dim
        self.model_label = label
        self.preprocess = preprocess
        self.max_length = max_length
        self.truncate = truncate
        self.cache = cache
        self._owns_cache = True  # False for a cache the caller opened and passed in: the caller closes it
        self.cache_dtype = cache_dtype
        self.truncate_dim = truncate_dim  # checked by check_truncate_dim once the fits are known
        self.units = method.units()
        self._backend: Backend | None = None
        # One lock for the backend (llama.cpp contexts are not thread-safe) and lazy state.
        self._lock = threading.RLock()

    # -- what subclasses provide ----------------------------------------------------

    def _open_backend(self) -> Backend:
        raise NotImplementedError

    def _vector_source(self) -> str:
        """The model part of this object's cache keys (only asked when there is a cache)."""
        raise NotImplementedError

    def _postprocess_fits(self) -> list[pp.Postprocess] | None:
        return None

    # -- properties --------------------------------------------------------------

    @property
    def dim(self) -> int:
        """The width of the vectors ``encode`` returns (a ``whiten:K`` post-processing makes it K, and
        ``truncate_dim`` shorter still)."""
        return self.truncate_dim or self.full_dim

    @property
    def full_dim(self) -> int:
        """The width before ``truncate_dim``: the model's, or its post-processing's."""
        fits = self._postprocess_fits()
        return fits[0].out_dim if fits else self._dim

    @property
    def read(self) -> Read | list[Read]:
        """What one vector is read from, as reports show it: a layer, or the layers ``combine_layers`` averages."""
        return list(self.layers) if self.combine_layers else self.layer

    def fit_kinds(self) -> list[str] | None:
        """Each layer's post-processing (``whiten:128``...), or None for raw vectors."""
        fits = self._postprocess_fits()
        return [f.kind for f in fits] if fits else None

    def check_truncate_dim(self, k: object, name: str = "truncate_dim") -> int | None:
        """``k`` (None: no cut) if this configuration's vectors can be cut to their first k coordinates: a
        whitened configuration (a whitened preset, or a whiten fit), or k the full width. Else a ValueError
        that says why (:func:`metaeol_edge.core.postprocess.check_prefix`)."""
        if k is None:
            return None
        return pp.check_prefix(k, self.full_dim, self.fit_kinds(), name)

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    @property
    def backend(self) -> Backend:
        """The backend, loaded on first need (a fully cached run never loads it)."""
        with self._lock:
            if self._backend is None:
                self._backend = self._open_backend()
            return self._backend

    def cache_keys(self, sentence: str, layer: int | None = None) -> list[CacheKey]:
        """The cache keys of a (stripped) sentence's prompt vectors at a layer, one per prompt of the method."""
        layer = self.layer if layer is None else layer
        source = self._vector_source()
        return [
            CacheKey(
                source,
                u.key,
                layer,
                self.preprocess,
                self.cache_dtype,
                self.max_length,
                sentence,
                self.method.cache_name,
            )
            for u in self.units
        ]

    # -- encoding ----------------------------------------------------------------

    def encode(
        self,
        sentences: str | Iterable[str],
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        show_progress_bar: bool | None = None,
        per_template: bool = False,
        stats: EncodeStats | None = None,
        truncate: bool | None = None,
        truncate_dim: int | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Embed sentences; float32 array (N, dim), or (N, T, dim) with ``per_template=True``.

        A single string gives a single vector, as in sentence-transformers. With
        a list of layers, a list of such arrays, one per layer. Built on
        :meth:`encode_batches`: the only array of the input's size is the result.
        ``truncate_dim`` keeps the first K coordinates of whitened vectors, for
        this call (the object's own ``truncate_dim`` otherwise).
        """
        if isinstance(sentences, bytes | bytearray):
            raise InputError("sentences must be str, not bytes: decode them first (e.g. data.decode('utf-8'))")
        single = isinstance(sentences, str)
        items: Sequence[str] = [sentences] if single else list(sentences)  # type: ignore[list-item]
        k = self.check_truncate_dim(self.truncate_dim if truncate_dim is None else truncate_dim)
        width = self._dim if per_template else (k or self.full_dim)
        shape = (len(items), len(self.units), width) if per_template else (len(items), width)
        results = [np.empty(shape, dtype=np.float32) for _ in range(len(self.layers) if self._multi else 1)]
        done = 0
        for batch in self.encode_batches(
            items,
            batch_size=batch_size,
            normalize_embeddings=normalize_embeddings,
            show_progress_bar=show_progress_bar,
            per_template=per_template,
            stats=stats,
            truncate=truncate,
            truncate_dim=k,
        ):
            per_layer = batch if self._multi else [batch]
            n = len(per_layer[0])
            for result, part in zip(results, per_layer, strict=True):
                result[done : done + n] = part
            done += n
        out = [r[0] if single else r for r in results]
        return out if self._multi else out[0]

    def encode_iter(
        self,
        sentences: Iterable[str],
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        show_progress_bar: bool | None = None,
        per_template: bool = False,
        stats: EncodeStats | None = None,
        total: int | None = None,
        truncate: bool | None = None,
        truncate_dim: int | None = None,
    ) -> Iterator[np.ndarray | list[np.ndarray]]:
        """Yield each sentence's vector (a list of them, one per layer, for several layers), in order.

        ``sentences`` may be any iterable, a generator reading a file say: it is
        consumed ``batch_size`` at a time, and memory stays bounded by that.
        """
        for batch in self.encode_batches(
            sentences,
            batch_size,
            normalize_embeddings,
            show_progress_bar,
            per_template,
            stats,
            total,
            truncate,
            truncate_dim=truncate_dim,
        ):
            if self._multi:
                yield from (list(rows) for rows in zip(*batch, strict=True))
            else:
                yield from batch

    def encode_batches(
        self,
        sentences: Iterable[str],
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        show_progress_bar: bool | None = None,
        per_template: bool = False,
        stats: EncodeStats | None = None,
        total: int | None = None,
        truncate: bool | None = None,
        *,
        raw: bool = False,
        start: int = 0,
        truncate_dim: int | None = None,
    ) -> Iterator[np.ndarray | list[np.ndarray]]:
        """Yield the vectors of each batch of ``batch_size`` sentences, in order.

        Each item is a float32 array (n, dim) (or (n, T, dim) with
        ``per_template``), or a list of them, one per layer. ``raw`` skips
        post-processing (what fitting it needs). ``truncate`` overrides the
        object's setting for this call (a server's per-request choice).
        ``start``: the index of the first sentence in a bigger input (a shard of
        a bulk job), so that errors and truncation records name the input's row.
        ``truncate_dim``: the first K coordinates of whitened vectors (default:
        the object's ``truncate_dim``), cut before normalizing.
        """
        if isinstance(sentences, str | bytes | bytearray):
            raise InputError("give an iterable of sentences, not a single string or bytes object")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        fits = None if raw else self._postprocess_fits()
        if per_template and self.combine_layers:
            raise ValueError("per_template vectors are each layer's own; combine_layers gives one vector per sentence")
        if fits is not None and per_template:
            raise ValueError("post-processing applies to the averaged vector; per_template vectors are raw")
        keep = None if raw else self.check_truncate_dim(self.truncate_dim if truncate_dim is None else truncate_dim)
        if keep is not None and keep < self.full_dim and per_template:
            raise ValueError("truncate_dim applies to the averaged, whitened vector; per_template vectors are raw")
        if total is None and hasattr(sentences, "__len__"):
            total = len(sentences)  # type: ignore[arg-type]
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty() and (total is None or total > batch_size)
        bar = _progress_bar(total, show_progress_bar)
        call = EncodeStats()
        try:
            offset = start
            for chunk in batched(sentences, batch_size):
                texts = self._clean(chunk, offset)
                states = self._states(texts, offset, call, bar, self.truncate if truncate is None else truncate)
                results = []
                for li in range(len(self.layers)):
                    result = states[:, li] if per_template else self.method.combine(states[:, li])
                    if fits is not None:
                        result = fits[li].apply(result)
                    results.append(result)
                if self.combine_layers:
                    results = [average_layers(results)]
                for li, result in enumerate(results):
                    if keep is not None and keep < result.shape[-1] and not per_template:
                        result = result[..., :keep]
                    if normalize_embeddings:
                        norms = np.linalg.norm(result, axis=-1, keepdims=True)
                        result = result / np.maximum(norms, 1e-12)
                    results[li] = result.astype(np.float32, copy=False)
                offset += len(texts)
                call.sentences = offset - start
                if bar is not None:
                    bar.n = offset - start
                    bar.refresh()
                yield results if self._multi else results[0]
        finally:
            if bar is not None:
                bar.close()
            if self.cache is not None and (call.hits or call.misses):
                self.cache.record_run(self.model_label, call.hits, call.misses)
            if stats is not None:
                stats.sentences += call.sentences
                stats.hits += call.hits
                stats.misses += call.misses
                stats.damaged += call.damaged
                stats.truncated.extend(call.truncated)

    def token_counts(self, sentences: Sequence[str]) -> list[int]:
        """Each sentence's own tokens (no template, no special tokens): what a server reports as usage."""
        with self._lock:
            backend = self.backend
            return [len(backend.tokenize(s.strip(), add_special=False)) for s in sentences]

    def similarity(self, a: str, b: str) -> float:
        if self._multi:
            raise ValueError("similarity needs a model with a single layer")
        va, vb = self.encode([a, b], show_progress_bar=False)
        return float(np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb)))

    # -- the steps ----------------------------------------------------------------

    def _clean(self, items: list[object], offset: int) -> list[str]:
        texts = []
        for i, s in enumerate(items, offset + 1):
            if isinstance(s, bytes | bytearray):
                raise InputError(f"sentence #{i} is bytes, not a string: decode it first")
            if not isinstance(s, str):
                raise InputError(f"sentence #{i} is {kind_of(s)}, not a string")
            s = s.strip()
            if not s:
                raise InputError(f"sentence #{i} is empty or whitespace only")
            if "\x00" in s:
                raise InputError(f"sentence #{i} contains a NUL character")
            texts.append(s)
        return texts

    def _states(self, sentences: list[str], offset: int, stats: EncodeStats, bar, truncate: bool) -> np.ndarray:
        """Prompt states (len, L, T, dim) of sentences[offset:...] of the caller's input, cache first."""
        n_t, n_l = len(self.units), len(self.layers)
        out = np.empty((len(sentences), n_l, n_t, self._dim), dtype=np.float32)
        # Truncation is decided (refused, or cut and reported) for every sentence, cached or not.
        fitted = [self._fit(s, offset + i, stats, truncate) for i, s in enumerate(sentences)]
        keys: dict[tuple[int, int, int], CacheKey] = {}
        if self.cache is None:
            todo = [(i, j) for i in range(len(sentences)) for j in range(n_t)]
        else:
            keys = {
                (i, li, j): k
                for i, s in enumerate(sentences)
                for li, layer in enumerate(self.layers)
                for j, k in enumerate(self.cache_keys(s, layer))
            }
            damaged: list[CacheKey] = []
            found = self.cache.get_many(list(keys.values()), damaged)
            if damaged:  # never a hit: recomputed below, and the bad entries replaced
                warnings.warn(
                    f"{len(damaged)} cached vector(s) failed their checksum in {self.cache.path}; recomputing them",
                    stacklevel=2,
                )
                stats.damaged += len(damaged)
                self.cache.discard(damaged)
            missing: set[tuple[int, int]] = set()  # (sentence, prompt): every layer is read in one pass
            for (i, li, j), k in keys.items():
                if k in found:
                    out[i, li, j] = found[k]
                else:
                    missing.add((i, j))
            todo = sorted(missing)
            self.cache.touch(k for k in keys.values() if k in found)
            stats.hits += len(found)
        stats.misses += len(todo)
        if not todo:
            return out
        fresh = self._compute(fitted, sentences, todo, bar)  # (L, len(todo), dim)
        if self.cache_dtype == "float16" and self.cache is not None:
            # Return what the cache will return next time, so warm and cold runs agree.
            fresh = fresh.astype(np.float16).astype(np.float32)
        for li in range(n_l):
            for (i, j), vec in zip(todo, fresh[li], strict=True):
                out[i, li, j] = vec
        if self.cache is not None:
            self.cache.put_many(
                [
                    (keys[(i, li, j)], self.model_label, self.units[j].label, fresh[li, k])
                    for li in range(n_l)
                    for k, (i, j) in enumerate(todo)
                ]
            )
        return out

    def _compute(self, fitted: list[str], sentences: list[str], todo: list[tuple[int, int]], bar) -> np.ndarray:
        """States (L, len(todo), dim) of the (sentence, prompt) pairs in ``todo``, from the backend."""
        with self._lock:
            backend = self.backend
            prompts = {i: self.method.prompts(fitted[i]) for i in {i for i, _ in todo}}
            per_prompt = 1 / len(self.units)
            progress = (lambda n: bar.update(n * per_prompt)) if bar is not None else None
            vectors = backend.states([prompts[i][j] for i, j in todo], self.layers, progress=progress)
        bad = sorted({todo[k][0] for k in np.flatnonzero(~np.isfinite(vectors).all(axis=(0, 2)))})
        if bad:  # never hand out (or cache) a NaN or infinite vector
            raise RuntimeError(
                f"the model produced non-finite values for {len(bad)} sentence(s), first: {sentences[bad[0]]!r}"
            )
        return vectors

    def _fit(self, sentence: str, index: int, stats: EncodeStats, truncate: bool = True) -> str:
        """Pre-process a sentence and cut it (never the template) so every prompt fits max_length."""
        text = preprocess(sentence) if self.preprocess else sentence
        longest = max(len(p.text.encode("utf-8")) for p in self.method.prompts(text))
        # A token covers at least one byte, plus BOS/EOS: most sentences need no tokenizing here.
        if longest + 4 <= self.max_length:
            return text
        with self._lock:
            return self._fit_tokens(self.backend, text, index, stats, truncate)

    def _fit_tokens(self, backend: Backend, text: str, index: int, stats: EncodeStats, truncate: bool) -> str:
        need = max(len(backend.tokenize(p.text)) for p in self.method.prompts(text))
        if need <= self.max_length:
            return text
        if not truncate:
            raise InputError(
                f"sentence #{index + 1} needs {need} tokens with its template, over max_length "
                f"{self.max_length} (truncation is off)"
            )
        tokens = backend.tokenize(text, add_special=False)
        overhead = need - len(tokens)
        keep = max(1, self.max_length - overhead - 4)
        while keep > 0:
            cut = backend.detokenize(tokens[:keep]).strip()
            cut = preprocess(cut) if self.preprocess else cut
            if all(len(backend.tokenize(p.text)) <= self.max_length for p in self.method.prompts(cut)):
                warnings.warn(
                    f"sentence #{index + 1} was truncated from {len(tokens)} to {keep} tokens to fit "
                    f"max_length {self.max_length}",
                    stacklevel=2,
                )
                stats.truncated.append(Truncation(index, len(tokens), keep))
                return cut
            keep -= 8
        raise InputError(f"the templates alone exceed max_length {self.max_length}")

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            if self.cache is not None:
                if self._owns_cache:  # a shared cache may still serve other models
                    self.cache.close()
                self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetaEOL(Embedder):
    """Sentence embeddings from a GGUF language model with meta-task prompts.

    >>> model = MetaEOL("smollm2-135m")  # a registry id, a .gguf path, ollama:NAME[:TAG], hf:OWNER/REPO/FILE.gguf
    >>> vectors = model.encode(["A man plays a guitar.", "Someone is making music."])
    >>> vectors.shape
    (2, 576)

    ``layer`` picks the hidden state: -1 (default) the final layer after the
    final norm, as the paper; k in 1..n_layer the output of block k; -j counts
    from the end; 0.8 means 80% of the depth; ``"attn:22-30"`` the attention
    outputs of blocks 22 to 30 at the read token, averaged (AlignedWVA,
    arXiv 2602.01572; :mod:`metaeol_edge.methods.layers`). A list of layers reads them all
    in one pass, and ``encode`` then returns one array per layer, or with
    ``combine_layers=True`` one array: their mean, each layer's vector at unit
    length first (a layer ensemble; raw vectors, no post-processing). With
    ``early_exit`` (default) a model asked only for lower layers runs a copy
    truncated above the highest one, written once into the model store.
    ``postprocess=True`` applies the fit stored by :meth:`fit_postprocess`.
    ``preset`` names a measured configuration (:mod:`metaeol_edge.presets`):
    its templates, layer and post-processing, with the fit it ships for the
    model or the user's own; the defaults stay the paper's.
    ``engine_mode``: ``"one-at-a-time"`` or ``"packed"`` (many prompts per
    decode, for GPUs; its own cache entries); None picks per device.
    ``method`` names a registered method (:mod:`metaeol_edge.methods`; default
    ``eol``, the paper's) or is a ``Method``; ``backend`` is ``llama.cpp``,
    ``naive``, ``pytorch`` (:mod:`metaeol_edge.backends`) or ``auto`` (None,
    the default, means ``$METAEOL_BACKEND``, else ``auto``: llama.cpp, or
    PyTorch in bfloat16 on a CPU with AMX tiles, :mod:`metaeol_edge.backends.choice`),
    with ``backend_options`` for it. ``resolved_config`` is the configuration
    with the backend ``auto`` chose. ``truncate_dim`` keeps the first K
    coordinates of whitened vectors (a whitened preset, or a ``whiten`` fit):
    whitening sorts them by variance, so they are a shorter embedding of the
    same space; elsewhere it is refused, saying why.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        templates: str | os.PathLike[str] | TemplateSet | None = None,
        *,
        preset: str | None = None,
        method: str | Method | None = None,
        backend: str | None = None,
        backend_options: dict[str, object] | None = None,
        n_gpu_layers: int = 0,
        engine_mode: str | None = None,
        n_threads: int | None = None,
        max_length: int = 512,
        preprocess: bool = True,
        truncate: bool = True,
        cache: bool | str | os.PathLike[str] | EmbeddingCache = True,
        cache_dtype: str = "float32",
        cache_max_bytes: int | None = None,
        layer: LayerSpec | Sequence[LayerSpec] | None = None,
        combine_layers: bool = False,
        early_exit: bool = True,
        postprocess: bool | None = None,
        verbose: bool = False,
        level: str | None = None,
        truncate_dim: int | None = None,
    ) -> None:
        # 0.2's keywords, kept: they build the one configuration (tests check that the two agree).
        self._build(EmbedConfig.of(**{k: v for k, v in locals().items() if k not in ("self", "__class__")}))

    @classmethod
    def from_config(cls, config: EmbedConfig) -> MetaEOL:
        """The embedder a configuration describes: what the CLI, the server, bulk jobs and integrations call."""
        made = cls.__new__(cls)
        made._build(config)
        return made

    def _build(self, config: EmbedConfig) -> None:
        self.config = config
        settings = config.kwargs()
        model, templates, preset, method = (settings[k] for k in ("model", "templates", "preset", "method"))
        layer, postprocess, early_exit, level = (settings[k] for k in ("layer", "postprocess", "early_exit", "level"))
        combine = bool(settings["combine_layers"])
        backend, backend_options = settings["backend"], settings["backend_options"]
        n_gpu_layers, engine_mode, n_threads, verbose = (
            settings[k] for k in ("n_gpu_layers", "engine_mode", "n_threads", "verbose")
        )
        max_length, truncate, preprocess = settings["max_length"], settings["truncate"], settings["preprocess"]
        cache, cache_dtype, cache_max_bytes = settings["cache"], settings["cache_dtype"], settings["cache_max_bytes"]
        named = get_preset(preset) if preset is not None else None  # an unknown name fails before any load
        wanted_level = quantization.requested(level)
        model = model or registry.default_model_id()
        label = str(model)
        resolved = resolve.resolve(model, progress=pull_progress() if sys.stderr.isatty() else None)
        self.model_path = self.source_path = resolved.path
        self.info = resolved.info
        self.preset: Preset | None = None
        known_sha256 = resolved.known_sha256
        if named is not None:
            # A preset may hold another choice for this very file: it is looked up by SHA-256, known
            # without hashing for registry, Ollama and hub files, hashed once otherwise.
            if known_sha256 is None and named.models:
                known_sha256 = resolved.sha256()
            self.preset = named.for_model(known_sha256)
            templates, layer, postprocess, combine = _apply_preset(self.preset, templates, layer, postprocess, combine)
        self._source_fingerprint: str | None = known_sha256
        backend, backend_options = self._choose_backend(settings, wanted_level, label)
        self.resolved_config = config.replace(backend=backend, backend_options=backend_options)
        self.level, self.level_reason = self._choose_level(wanted_level, backend, label)
        if self.level != quantization.SHIPPED:
            known_sha256 = self._derive_level(model, label)
        templates = "metaeol" if templates is None else templates
        layer = FINAL if layer is None else layer
        self.templates = templates if isinstance(templates, TemplateSet) else load_templates(templates)
        if self.info.n_ctx_train and isinstance(max_length, int) and max_length > self.info.n_ctx_train:
            # Positions past the training context are untrained: slow, and no vector worth having.
            raise ValueError(
                f"max_length {max_length} is over {label}'s training context of "
                f"{self.info.n_ctx_train} tokens; use at most {self.info.n_ctx_train}"
            )
        self._backend_spec = spec_for(backend)
        options = dict(backend_options or {})
        if self._backend_spec.name == "llama.cpp":
            options = dict(n_gpu_layers=n_gpu_layers, n_threads=n_threads, max_length=max_length, verbose=verbose)
            # One prompt per decode on the CPU, where packing measured slower (README, "Throughput
            # mode and GPUs"); packed when layers are offloaded. That GPU default is not yet measured.
            options["mode"] = engine_mode or ("packed" if n_gpu_layers != 0 else "one-at-a-time")
            options |= backend_options or {}
            check_engine_options(options["mode"], options.get("align", 16), options.get("pack"))  # type: ignore[arg-type]
        elif engine_mode is not None:
            raise ValueError(f"engine_mode applies to the llama.cpp backend, not to {self._backend_spec.name!r}")
        elif self._backend_spec.name == "naive":
            options = dict(n_threads=n_threads) | options
        self._backend_options = options
        layers, multi = resolve_layers(layer, self.info.n_layer)
        # Early exit: nothing above the highest block asked for needs computing (llama.cpp only;
        # a split model is run whole: its truncated copy would need every part rewritten).
        uses_engine = self._backend_spec.name == "llama.cpp" and self.info.split_count == 1
        self._exit_blocks = early_exit_blocks(layers, self.info.n_layer, early_exit and uses_engine)
        made = make_method(method, self.templates)
        made.check_depth(self.info.n_layer)  # before the cache opens: nothing to close on a refusal
        if combine and len(layers) < 2:
            raise ValueError(COMBINE_NEEDS_LAYERS)
        if combine and postprocess:
            raise ValueError(COMBINE_NO_FIT)
        self.postprocess = bool(postprocess)
        self._fits: dict[int, pp.Postprocess] = {}
        self._fingerprint: str | None = known_sha256
        opened: EmbeddingCache | None
        if isinstance(cache, EmbeddingCache):
            opened = cache
        elif cache is False or cache is None:
            opened = None
        else:
            opened = EmbeddingCache.open(None if cache is True else Path(cache), max_bytes=cache_max_bytes)
        super().__init__(
            made,
            layers,
            multi,
            self.info.n_embd,
            label=label,
            preprocess=preprocess,
            max_length=max_length,
            truncate=truncate,
            cache=opened,
            cache_dtype=cache_dtype,
            truncate_dim=settings["truncate_dim"],
            combine_layers=combine,
        )
        self._owns_cache = not isinstance(cache, EmbeddingCache)
        if self.truncate_dim is not None:
            try:  # refused now, not at the first encode (the fits are small files)
                self.check_truncate_dim(self.truncate_dim)
            except BaseException:
                self.close()
                raise

    # -- the model -----------------------------------------------------------------

    def _choose_backend(self, settings: dict, wanted_level: str, label: str) -> tuple[str, dict | None]:
        """(backend, its options): the one asked for, or what ``auto`` runs here (:mod:`.backends.choice`)."""
        asked = backend_choice.requested(settings["backend"])
        if asked != backend_choice.AUTO:
            self.backend_reason = "asked for"
            return asked, settings["backend_options"]
        given = {
            "n_threads": settings["n_threads"] is not None,
            "engine_mode": settings["engine_mode"] is not None,
            "n_gpu_layers": settings["n_gpu_layers"] != 0,
            "backend_options": bool(settings["backend_options"]),
            "level": wanted_level != quantization.AUTO,
        }
        picked = backend_choice.choose(
            self.info.architecture,
            self.info.split_count,
            [name for name, set_ in given.items() if set_],
            backend_choice.cpu_flags(),
            backend_choice.torch_installed(),
        )
        self.backend_reason = picked.reason
        backend_choice.announce(label, picked, store.home())
        return picked.name, (dict(picked.options) or settings["backend_options"])

    def _choose_level(self, wanted: str, backend: str, label: str) -> tuple[str, str]:
        """(level, why). ``auto`` decides for the llama.cpp engine on a whole (unsplit) file; the PyTorch
        reference and the naive recipe read the file as given unless a level is named."""
        if wanted == quantization.SHIPPED:
            return wanted, "asked for"
        if self.info.split_count != 1:
            if wanted == quantization.AUTO:
                return quantization.SHIPPED, "a split model runs as shipped"
            raise ValueError(f"{label} is split into {self.info.split_count} files: levels need a whole file")
        if wanted != quantization.AUTO:
            return wanted, "asked for"
        if backend != "llama.cpp":
            return quantization.SHIPPED, f"the {backend} backend reads the file as given"
        choice = quantization.choose(self.info.quantization, quantization.system_info(), self.info.size)
        return choice.level, choice.reason

    def _derive_level(self, model: str | os.PathLike[str], label: str) -> str | None:
        """Switch to the model at ``self.level``, made once into the store; return its SHA-256 if known."""
        if self._source_fingerprint is None:
            known = resolve.known_sha256(label, self.source_path)
            self._source_fingerprint = known or digest.fingerprint(self.source_path)
        note = (
            f"metaeol: {label} runs at {self.level} here, not its shipped {self.info.quantization or 'file'}: "
            f"{self.level_reason}. Writing it once into the model store (level='shipped', --level shipped or "
            f"{quantization.ENV}=shipped keeps the shipped file)."
        )
        self.model_path = resolve.quantized(model, self.level, source_sha256=self._source_fingerprint, announce=note)
        self.info = inspect_gguf(self.model_path)
        return store.stamped_sha256(self.model_path)  # the derived file's own identity

    @property
    def source_fingerprint(self) -> str:
        """SHA-256 of the model file as given, before a level was derived from it: what presets and their
        shipped fits are chosen by. The same as :attr:`fingerprint` at the shipped level."""
        if self._source_fingerprint is None:
            return self.fingerprint
        return self._source_fingerprint

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model file: one known without hashing (the registry's, an Ollama blob's, a hub pull's,
        ``models list``'s), or computed once and remembered in the cache. A split model: all its parts."""
        with self._lock:
            if self._fingerprint is None:
                memo = None
                if self.cache is not None:
                    cache = self.cache
                    memo = lambda path: cache.file_sha256(path, digest.sha256_file)  # noqa: E731
                known = resolve.known_sha256(self.model_label, self.model_path)
                known = known or store.stamped_sha256(self.model_path)  # a level derived into the store
                self._fingerprint = digest.fingerprint(self.model_path, known, memo)
            return self._fingerprint

    @property
    def engine(self):
        """The llama.cpp engine behind the default backend (for inspection and benchmarks)."""
        backend = self.backend
        engine = getattr(backend, "engine", None)
        if engine is None:
            raise AttributeError(f"the {backend.name} backend has no llama.cpp engine")
        return engine

    def _open_backend(self) -> Backend:
        return open_backend(self._backend_spec.name, self._backend_model_path(), **self._backend_options)

    def _backend_model_path(self) -> Path:
        if self._exit_blocks is None:
            return self.model_path
        tag = digest.early_exit_tag(self._exit_blocks)
        path = store.derived_path(self.model_path, self.fingerprint, tag)
        if not path.is_file():
            if sys.stderr.isatty():
                print(f"writing a copy of the model without its upper blocks: {path}", file=sys.stderr)
            truncate_gguf(self.model_path, path, self._exit_blocks)
        return path

    def _vector_source(self) -> str:
        # An early-exit model is another file: its vectors may differ in the last bits.
        tag = self._backend_spec.cache_tag(self._backend_options)
        return identity.vector_source(self.fingerprint, self._exit_blocks, tag)

    # -- post-processing ---------------------------------------------------------

    def postprocess_path(self, layer: int) -> Path:
        """Where the post-processing fit for this model, method and (resolved) layer is stored."""
        tag = self._backend_spec.cache_tag(self._backend_options)
        method = ":".join(x for x in (self.method.cache_name, tag) if x)
        key = identity.fit_key(
            self.fingerprint, [u.key for u in self.units], layer, self.preprocess, self.max_length, method
        )
        return store.store_dir() / "postprocess" / f"{key}.npz"

    def fit_postprocess(
        self,
        sentences: Iterable[str],
        kind: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> list[Path]:
        """Fit post-processing on an unlabeled corpus, store it, and switch it on.

        ``kind``: center, standardize, whiten, whiten:K or abtt:K
        (:mod:`metaeol_edge.postprocess`); default the preset's, else
        standardize. The stored fit wins over a preset's shipped one. Never fit
        on the sentences you evaluate on: that leaks their statistics. Returns
        the stored files, one per layer.
        """
        if self.combine_layers:
            raise ValueError(COMBINE_NO_FIT)
        if kind is None:
            kind = (self.preset.postprocess if self.preset is not None else None) or "standardize"
        pp.parse_kind(kind)
        batches = list(self.encode_batches(sentences, batch_size, show_progress_bar=show_progress_bar, raw=True))
        if not batches:
            raise InputError("fitting post-processing needs sentences")
        per_layer = [np.concatenate([b[li] if self._multi else b for b in batches]) for li in range(len(self.layers))]
        paths = []
        for layer, vectors in zip(self.layers, per_layer, strict=True):
            fitted = pp.fit(vectors, kind)
            path = self.postprocess_path(layer)
            meta = {"model": self.model_label, "templates": self.templates.name, "layer": layer, "fit_on": "user"}
            pp.save(fitted, path, meta)
            with self._lock:
                self._fits[layer] = fitted
            paths.append(path)
        self.postprocess = True
        return paths

    def _postprocess_fits(self) -> list[pp.Postprocess] | None:
        if not self.postprocess:
            return None
        return [self._fit_for(layer) for layer in self.layers]

    def postprocess_source(self, layer: int | None = None) -> Path | None:
        """The fit applied at a layer: the user's stored one, else the preset's shipped one, else None."""
        layer = self.layer if layer is None else layer
        path = self.postprocess_path(layer)
        if path.is_file():
            return path
        if self.preset is None or self.preset.postprocess is None:  # a raw choice ships no fit for this file
            return None
        return self.preset.shipped_fit(self.source_fingerprint)

    def _fit_for(self, layer: int) -> pp.Postprocess:
        with self._lock:
            if layer not in self._fits:
                path = self.postprocess_source(layer)
                if path is None:
                    how, shipped = f"--templates {self.templates.name} --layer {layer}", ""
                    if self.preset is not None:
                        how = f"--preset {self.preset.label}"
                        models = ", ".join(self.preset.fits) or "none"
                        shipped = f" (preset {self.preset.label} ships fits for: {models})"
                    raise ModelError(
                        f"no post-processing fitted for {self.model_label}, templates {self.templates.name}, layer "
                        f"{layer}{shipped}; run: metaeol fit-postprocess --model {self.model_label} {how} "
                        "--input CORPUS.txt (unlabeled text of your domain, not test data)"
                    )
                self._fits[layer] = pp.load(path)
            return self._fits[layer]


def _apply_preset(
    preset: Preset,
    templates: str | os.PathLike[str] | TemplateSet | None,
    layer: LayerSpec | Sequence[LayerSpec] | None,
    postprocess: bool | None,
    combine: bool,
) -> tuple[str, LayerSpec | Sequence[LayerSpec], bool | None, bool]:
    """The preset's templates, layer, post-processing and layer combination (as resolved for the model); an
    explicit different choice is an error, not a mix."""
    if templates is not None and templates != preset.templates:
        raise ValueError(f"preset {preset.label!r} sets templates={preset.templates!r}; do not pass templates too")
    if layer is not None and _layer_text(layer) != _layer_text(preset.layer):
        raise ValueError(f"preset {preset.label!r} sets layer={_layer_text(preset.layer)}; do not pass layer too")
    if combine and not preset.combine_layers:
        raise ValueError(f"preset {preset.label!r} reads one layer; do not pass combine_layers")
    if preset.postprocess is None:  # this model's choice is the raw vectors; a fit of the user's on request
        return preset.templates, preset.layer, postprocess, preset.combine_layers
    if postprocess is False:
        raise ValueError(f"preset {preset.label!r} is its post-processing ({preset.postprocess}); it cannot be off")
    return preset.templates, preset.layer, True, preset.combine_layers


def _layer_text(layer: LayerSpec | Sequence[LayerSpec]) -> str:
    """A layer choice as people write it (``1.0``, ``29,24``): a list and a tuple of the same layers agree."""
    return ",".join(str(x) for x in layer) if isinstance(layer, list | tuple) else str(layer)


def average_layers(per_layer: list[np.ndarray]) -> np.ndarray:
    """Several layers' (n, dim) vectors of the same sentences -> their mean, each scaled to unit length first.

    Layers differ in scale (a block's output grows with depth), so a plain mean would be the deepest layer's
    vector; at unit length each layer counts equally, and a sentence's vector needs nothing but its own reads
    (no fit). This is ``unit:`` in benchmarks/quality.py, which chose it on STS-B dev.
    """
    scaled = [v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12) for v in per_layer]
    return np.mean(scaled, axis=0, dtype=np.float32)


def batched(items: Iterable[object], size: int) -> Iterator[list[object]]:
    """Lists of ``size`` items in order (the last may be shorter), taken from any iterable as it streams."""
    chunk: list[object] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress_bar(total: int | None, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sent", desc="embedding", file=sys.stderr, dynamic_ncols=True)


def pull_progress():
    """A byte progress bar for model pulls, one bar per label."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(done: int, total: int | None, label: str) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, unit="B", unit_scale=True, desc=f"pulling {label}", file=sys.stderr)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update
