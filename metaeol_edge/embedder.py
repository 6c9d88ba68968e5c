"""``MetaEOL.encode``: prompts + cache + engine, in the style of sentence-transformers."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import postprocess as pp
from . import registry
from .cache import CacheKey, EmbeddingCache
from .engine import FINAL, Engine, Prompt, resolve_layers
from .errors import InputError, ModelError
from .modelfile import inspect_gguf, truncate_gguf
from .prompts import TemplateSet, load_templates, preprocess

LayerSpec = int | float | str


class MetaEOL:
    """Sentence embeddings from a GGUF language model with meta-task prompts.

    >>> model = MetaEOL("smollm2-135m")               # a registry id or a .gguf path
    >>> vectors = model.encode(["A man plays a guitar.", "Someone is making music."])
    >>> vectors.shape
    (2, 576)

    ``layer`` picks the hidden state: -1 (default) the final layer after the
    final norm, as the paper; k in 1..n_layer the output of block k; -j counts
    from the end; 0.8 means 80% of the depth. A list of layers reads them all
    in one pass, and ``encode`` then returns one array per layer. With
    ``early_exit`` (default) a model asked only for lower layers runs a copy
    truncated above the highest one, written once into the model store.
    ``postprocess=True`` applies the fit stored by :meth:`fit_postprocess`.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        templates: str | os.PathLike[str] | TemplateSet = "metaeol",
        *,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        max_length: int = 512,
        preprocess: bool = True,
        truncate: bool = True,
        cache: bool | str | os.PathLike[str] | EmbeddingCache = True,
        cache_dtype: str = "float32",
        cache_max_bytes: int | None = None,
        layer: LayerSpec | Sequence[LayerSpec] = FINAL,
        early_exit: bool = True,
        postprocess: bool = False,
        verbose: bool = False,
    ) -> None:
        model = model or registry.default_model_id()
        self.model_label = str(model)
        self.model_path = registry.resolve_model(model, progress=_pull_progress() if sys.stderr.isatty() else None)
        self.info = inspect_gguf(self.model_path)
        self.templates = templates if isinstance(templates, TemplateSet) else load_templates(templates)
        if cache_dtype not in ("float32", "float16"):
            raise ValueError("cache_dtype must be 'float32' or 'float16'")
        if max_length < 16:
            raise ValueError("max_length must be at least 16 tokens")
        self.max_length = max_length
        self.preprocess = preprocess
        self.truncate = truncate
        self.cache_dtype = cache_dtype
        self.layers, self._multi = resolve_layers(layer, self.info.n_layer)
        self.layer = self.layers[0]
        top = max(self.layers)
        # Early exit: nothing above the highest block asked for needs computing.
        self._exit_blocks = top if early_exit and FINAL not in self.layers and top < self.info.n_layer else None
        self.postprocess = postprocess
        self._fits: dict[int, pp.Postprocess] = {}
        self._engine_args = dict(n_gpu_layers=n_gpu_layers, n_threads=n_threads, max_length=max_length, verbose=verbose)
        self._engine: Engine | None = None
        self.cache: EmbeddingCache | None
        if isinstance(cache, EmbeddingCache):
            self.cache = cache
        elif cache is False or cache is None:
            self.cache = None
        else:
            self.cache = EmbeddingCache.open(None if cache is True else Path(cache), max_bytes=cache_max_bytes)
        self._fingerprint: str | None = None
        self.last_hits = 0
        self.last_misses = 0

    # -- properties --------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.info.n_embd

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    @property
    def engine(self) -> Engine:
        """The llama.cpp engine, loaded on first need (a fully cached run never loads it)."""
        if self._engine is None:
            self._engine = Engine(self._engine_model_path(), **self._engine_args)
        return self._engine

    def _engine_model_path(self) -> Path:
        if self._exit_blocks is None:
            return self.model_path
        path = registry.derived_path(self.model_path, self.fingerprint, f"blocks{self._exit_blocks}")
        if not path.is_file():
            if sys.stderr.isatty():
                print(f"writing a copy of the model without its upper blocks: {path}", file=sys.stderr)
            truncate_gguf(self.model_path, path, self._exit_blocks)
        return path

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model file: the registry's (checked at pull) or computed once and remembered."""
        if self._fingerprint is None:
            spec = _registry_spec(self.model_label)
            if spec is not None and self.model_path == registry.model_path(spec.id):
                self._fingerprint = spec.sha256
            elif self.cache is not None:
                self._fingerprint = self.cache.file_sha256(self.model_path, registry.sha256_file)
            else:
                self._fingerprint = registry.sha256_file(self.model_path)
        return self._fingerprint

    # -- encoding ----------------------------------------------------------------

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        show_progress_bar: bool | None = None,
        per_template: bool = False,
    ) -> np.ndarray | list[np.ndarray]:
        """Embed sentences; float32 array (N, dim), or (N, T, dim) with ``per_template=True``.

        A single string gives a single vector, as in sentence-transformers. With
        a list of layers, a list of such arrays, one per layer.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if per_template and self.postprocess:
            raise ValueError("post-processing applies to the averaged vector; per_template vectors are raw")
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        texts = self._clean(items)
        fits = [self._fit_for(layer) for layer in self.layers] if self.postprocess else None
        n_t = len(self.templates)
        out = np.empty((len(texts), len(self.layers), n_t, self.dim), dtype=np.float32)
        if show_progress_bar is None:
            show_progress_bar = sys.stderr.isatty() and len(texts) > batch_size
        bar = _progress_bar(len(texts), show_progress_bar)
        self.last_hits = self.last_misses = 0
        try:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                out[start : start + len(chunk)] = self._encode_chunk(chunk, start)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
            if self.cache is not None and (self.last_hits or self.last_misses):
                self.cache.record_run(self.model_label, self.last_hits, self.last_misses)
        results = []
        for li in range(len(self.layers)):
            result = out[:, li] if per_template else out[:, li].mean(axis=1, dtype=np.float32)
            if fits is not None:
                result = fits[li].apply(result)
            if normalize_embeddings:
                norms = np.linalg.norm(result, axis=-1, keepdims=True)
                result = result / np.maximum(norms, 1e-12)
            result = result.astype(np.float32, copy=False)
            results.append(result[0] if single else result)
        return results if self._multi else results[0]

    # -- post-processing ---------------------------------------------------------

    def postprocess_path(self, layer: int) -> Path:
        """Where the post-processing fit for this model, template set and (resolved) layer is stored."""
        key = pp.fit_key(
            self.fingerprint, [t.text for t in self.templates.templates], layer, self.preprocess, self.max_length
        )
        return registry.store_dir() / "postprocess" / f"{key}.npz"

    def fit_postprocess(
        self,
        sentences: Sequence[str],
        kind: str = "standardize",
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> list[Path]:
        """Fit per-dimension post-processing on an unlabeled corpus, store it, and switch it on.

        Never fit on the sentences you evaluate on: that leaks their statistics.
        Returns the stored files, one per layer.
        """
        if kind not in pp.KINDS:
            raise ValueError(f"post-processing kind must be one of {', '.join(pp.KINDS)}, not {kind!r}")
        enabled, self.postprocess = self.postprocess, False
        try:
            raw = self.encode(list(sentences), batch_size=batch_size, show_progress_bar=show_progress_bar)
        finally:
            self.postprocess = enabled
        per_layer = raw if self._multi else [raw]
        paths = []
        for layer, vectors in zip(self.layers, per_layer, strict=True):
            fitted = pp.fit(vectors, kind)
            path = self.postprocess_path(layer)
            meta = {"model": self.model_label, "templates": self.templates.name, "layer": layer}
            pp.save(fitted, path, meta)
            self._fits[layer] = fitted
            paths.append(path)
        self.postprocess = True
        return paths

    def _fit_for(self, layer: int) -> pp.Postprocess:
        if layer not in self._fits:
            path = self.postprocess_path(layer)
            if not path.is_file():
                raise ModelError(
                    f"no post-processing fitted for {self.model_label}, templates {self.templates.name}, layer "
                    f"{layer}; run: metaeol fit-postprocess --model {self.model_label} --templates "
                    f"{self.templates.name} --layer {layer} --input CORPUS.txt"
                )
            self._fits[layer] = pp.load(path)
        return self._fits[layer]

    def similarity(self, a: str, b: str) -> float:
        if self._multi:
            raise ValueError("similarity needs a model with a single layer")
        va, vb = self.encode([a, b], show_progress_bar=False)
        return float(np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb)))

    def _clean(self, items: list[object]) -> list[str]:
        texts = []
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise InputError(f"sentence #{i + 1} is a {type(s).__name__}, not a string")
            s = s.strip()
            if not s:
                raise InputError(f"sentence #{i + 1} is empty or whitespace only")
            if "\x00" in s:
                raise InputError(f"sentence #{i + 1} contains a NUL character")
            texts.append(s)
        return texts

    def cache_keys(self, sentence: str, layer: int | None = None) -> list[CacheKey]:
        """The cache keys of a (stripped) sentence's prompt vectors at a layer, one per template."""
        layer = self.layer if layer is None else layer
        # An early-exit model is another file: its vectors may differ in the last bits.
        model = self.fingerprint if self._exit_blocks is None else f"{self.fingerprint}:blocks{self._exit_blocks}"
        return [
            CacheKey(model, t.text, layer, self.preprocess, self.cache_dtype, self.max_length, sentence)
            for t in self.templates.templates
        ]

    def _encode_chunk(self, sentences: list[str], offset: int) -> np.ndarray:
        """Vectors (len, L, T, dim) of sentences[offset:...] of the caller's list."""
        n_t, n_l = len(self.templates), len(self.layers)
        out = np.empty((len(sentences), n_l, n_t, self.dim), dtype=np.float32)
        todo: list[tuple[int, int]] = []  # (sentence index, template index): every layer is read in one pass
        if self.cache is None:
            todo = [(i, j) for i in range(len(sentences)) for j in range(n_t)]
        else:
            keys = {
                (i, li, j): k
                for i, s in enumerate(sentences)
                for li, layer in enumerate(self.layers)
                for j, k in enumerate(self.cache_keys(s, layer))
            }
            found = self.cache.get_many(list(keys.values()))
            missing: set[tuple[int, int]] = set()
            for (i, li, j), k in keys.items():
                if k in found:
                    out[i, li, j] = found[k]
                else:
                    missing.add((i, j))
            todo = sorted(missing)
            self.cache.touch(k for k in keys.values() if k in found)
            self.last_hits += len(found)
        self.last_misses += len(todo)
        if not todo:
            return out
        fresh = self._compute(sentences, todo, offset)  # (L, len(todo), dim)
        if self.cache_dtype == "float16" and self.cache is not None:
            # Return what the cache will return next time, so warm and cold runs agree.
            fresh = fresh.astype(np.float16).astype(np.float32)
        for li in range(n_l):
            for (i, j), vec in zip(todo, fresh[li], strict=True):
                out[i, li, j] = vec
        if self.cache is not None:
            self.cache.put_many(
                [
                    (keys[(i, li, j)], self.model_label, self.templates.templates[j].task, fresh[li, k])
                    for li in range(n_l)
                    for k, (i, j) in enumerate(todo)
                ]
            )
        return out

    def _compute(self, sentences: list[str], todo: list[tuple[int, int]], offset: int) -> np.ndarray:
        engine = self.engine
        placed = {i: self._fit(sentences[i], offset + i) for i in {i for i, _ in todo}}
        prefix_tokens = {j: engine.tokenize(self.templates.templates[j].prefix) for j in {j for _, j in todo}}
        prompts = [
            Prompt(engine.tokenize(self.templates.templates[j].render(placed[i])), prefix_tokens[j]) for i, j in todo
        ]
        vectors = engine.embed(prompts, layers=self.layers)
        bad = sorted({todo[k][0] for k in np.flatnonzero(~np.isfinite(vectors).all(axis=(0, 2)))})
        if bad:  # never hand out (or cache) a NaN or infinite vector
            raise RuntimeError(
                f"the model produced non-finite values for {len(bad)} sentence(s), first: {sentences[bad[0]]!r}"
            )
        return vectors

    def _fit(self, sentence: str, index: int) -> str:
        """Pre-process a sentence and cut it (never the template) so every prompt fits max_length."""
        text = preprocess(sentence) if self.preprocess else sentence
        longest = max(self.templates.templates, key=lambda t: len(t.text.encode("utf-8")))
        # A token covers at least one byte, plus BOS/EOS: most sentences need no tokenizing here.
        if len(longest.render(text).encode("utf-8")) + 4 <= self.max_length:
            return text
        engine = self.engine
        need = max(len(engine.tokenize(t.render(text))) for t in self.templates.templates)
        if need <= self.max_length:
            return text
        if not self.truncate:
            raise InputError(
                f"sentence #{index + 1} needs {need} tokens with its template, over max_length "
                f"{self.max_length} (truncation is off)"
            )
        tokens = engine.tokenize(text, add_special=False)
        overhead = need - len(tokens)
        keep = max(1, self.max_length - overhead - 4)
        while keep > 0:
            cut = engine.detokenize(tokens[:keep]).strip()
            cut = preprocess(cut) if self.preprocess else cut
            if all(len(engine.tokenize(t.render(cut))) <= self.max_length for t in self.templates.templates):
                warnings.warn(
                    f"sentence #{index + 1} was truncated from {len(tokens)} to {keep} tokens to fit "
                    f"max_length {self.max_length}",
                    stacklevel=4,
                )
                return cut
            keep -= 8
        raise InputError(f"the templates alone exceed max_length {self.max_length}")

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self) -> MetaEOL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _registry_spec(label: str) -> registry.ModelSpec | None:
    if registry.looks_like_path(label):
        return None
    try:
        return registry.get_spec(label)
    except registry.ModelError:
        return None


def _progress_bar(total: int, show: bool):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="sent", desc="embedding", file=sys.stderr, dynamic_ncols=True)


def _pull_progress():
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
