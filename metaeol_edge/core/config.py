"""One frozen configuration for an embedder: what every face builds once and hands down.

The CLI, the server, bulk jobs, the integrations and Python (``MetaEOL(...)``'s
keywords) all describe a model the same way, as an :class:`EmbedConfig`. The
embedder is built from it (:meth:`metaeol_edge.MetaEOL.from_config`), and a bulk
job names its vectors by :meth:`EmbedConfig.identity`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

NOT_IDENTITY = ("n_threads", "cache_max_bytes", "verbose")
"""Settings that change how fast or how much is kept, never a vector: a job that changes only these continues."""


def _freeze(value: Any) -> Any:
    """A hashable, comparable form: lists become tuples, paths strings, mappings sorted item tuples."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that decides an embedder: the model, the method, the reads, the backend, length and cache.

    The fields are ``MetaEOL``'s keyword arguments, with the same defaults and
    meanings (see :class:`metaeol_edge.MetaEOL`). ``backend_options`` is kept as
    sorted ``(name, value)`` pairs so the configuration stays hashable; a dict
    given to :meth:`of` is converted.
    """

    # the model
    model: str | None = None
    level: str | None = None
    # the method and what it reads
    templates: Any = None  # a template set's name or file, or a TemplateSet
    preset: str | None = None
    method: Any = None  # a registered method's name, or a Method
    layer: Any = None  # a layer or an attention span ("attn:22-30"), or a tuple of them
    combine_layers: bool = False  # several layers averaged into one vector (each at unit length first)
    early_exit: bool = True
    postprocess: bool | None = None
    truncate_dim: int | None = None  # the first K of whitened vectors
    preprocess: bool = True
    # length
    max_length: int = 512
    truncate: bool = True
    # the backend
    backend: str | None = None  # None: $METAEOL_BACKEND, else auto (metaeol_edge.backends.choice)
    backend_options: tuple[tuple[str, Any], ...] = field(default=())
    n_gpu_layers: int = 0
    engine_mode: str | None = None
    n_threads: int | None = None
    verbose: bool = False
    # the cache
    cache: Any = True  # True (this machine's), False, a path, or an open EmbeddingCache
    cache_dtype: str = "float32"
    cache_max_bytes: int | None = None

    @classmethod
    def of(cls, **kwargs: Any) -> EmbedConfig:
        """A configuration from ``MetaEOL``'s keyword arguments; an unknown name is refused, naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if kwargs.get("backend_options") is None:
            kwargs.pop("backend_options", None)  # MetaEOL's default: no options
        return cls(**{k: _freeze(v) if k in ("model", "layer", "backend_options") else v for k, v in kwargs.items()})

    def replace(self, **changes: Any) -> EmbedConfig:
        return EmbedConfig.of(**(self.kwargs() | changes))

    def kwargs(self) -> dict[str, Any]:
        """``MetaEOL``'s keyword arguments (``backend_options`` as a dict again)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["backend_options"] = dict(self.backend_options) or None
        if isinstance(self.layer, tuple):
            out["layer"] = list(self.layer)
        return out

    def identity(self) -> dict[str, Any]:
        """The settings that decide a vector, as plain JSON values (a bulk job's identity holds them).

        Compared with :func:`decisive_options` applied to both sides, so an identity
        written with fewer keys (0.2 wrote only what the CLI passed) still matches.
        """
        return decisive_options(self.kwargs())


def decisive_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (``MetaEOL`` keywords) with every default filled in and what never changes a vector dropped.

    Without a cache nothing is rounded, so ``cache_dtype`` then counts as float32,
    and the cache's location never decides a vector, only whether there is one.
    """
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in fields(EmbedConfig)}
    merged = defaults | dict(options)
    merged = {k: v for k, v in merged.items() if k not in NOT_IDENTITY}
    merged["backend_options"] = dict(_freeze(merged["backend_options"] or {}))
    # An identity is written from a resolved configuration (MetaEOL.resolved_config); 0.2's, which had one
    # backend, named none.
    merged["backend"] = merged.get("backend") or "llama.cpp"
    on = merged.pop("cache", True) not in (False, None)
    merged["cache_dtype"] = (merged.get("cache_dtype") or "float32") if on else "float32"
    return json.loads(json.dumps(merged, default=str))
