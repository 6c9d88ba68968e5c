"""What a collection's vectors depend on: the options it was made with, and the identity they resolve to.

``options`` are the settings of an :class:`~metaeol_edge.core.config.EmbedConfig` as the user chose them (the
level as resolved on the machine that made the collection), enough to build the
same model again. ``identity`` is what those options resolve to, in the terms of
:mod:`metaeol_edge.core.identity` that name a cached vector: the model file's
fingerprint with its early exit and backend, the prompts, method, layer,
pre-processing, length, dtype and post-processing fit, plus the chunking. A
query is embedded only by a model whose identity equals the collection's; any
difference is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from metaeol_edge.core.config import EmbedConfig
from metaeol_edge.errors import InputError
from metaeol_edge.models.digest import key_digest, sha256_file

# MetaEOL's options that do not decide a vector: they stay the caller's, never stored.
RUNTIME = ("n_threads", "cache", "cache_max_bytes", "verbose", "truncate", "n_gpu_layers", "engine_mode")
# Identity fields that are shown, not compared (another path to the same file is the same model).
SHOWN = ("model", "templates")
LABELS = {
    "vectors": "model file and backend",
    "prompts": "templates (their exact text)",
    "method": "method",
    "layer": "layer",
    "preprocess": "pre-processing",
    "max_length": "max_length",
    "cache_dtype": "cache dtype",
    "postprocess": "post-processing fit",
    "dim": "vector width",
    "overlap": "chunk overlap",
}


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(EmbedConfig)}


DEFAULT_METHOD = {"preset": "quality"}
"""What a new collection embeds with when given no method: the quality preset, one prompt per chunk. Chosen
by quality per second on ``benchmarks/retrieval.py``'s rows (docs/benchmarks/search.md): its mean nDCG@10
over the STS-B, SICK and MRPC pairs is at MetaEOL's level or above, at one prompt per chunk instead of eight.
A collection stores the preset's revision (``quality@4``), so a later revision does not change its vectors."""
WITHOUT_FIT = {"templates": "ke-icl-music", "layer": 1.0}
"""The quality preset's prompt and read, without its whitening fit: the default for a model the preset
ships no fit for (a test holds it to the preset's data)."""
METHOD_OPTIONS = ("preset", "templates", "method", "layer", "combine_layers", "postprocess")


def with_default_method(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (a new collection's chosen options), with :data:`DEFAULT_METHOD` where it names no method."""
    return given if any(k in given for k in METHOD_OPTIONS) else given | DEFAULT_METHOD


def chosen(options: dict[str, Any]) -> dict[str, Any]:
    """The options that decide vectors and differ from ``MetaEOL``'s defaults, as plain JSON values."""
    defaults = _defaults()
    out = {}
    for key, value in options.items():
        if key in RUNTIME or value is None or (key in defaults and value == defaults[key]):
            continue
        if key not in defaults:
            raise InputError(f"unknown option {key!r} for a collection's model")
        if isinstance(value, os.PathLike):
            value = os.path.abspath(value)
        elif key == "model" and isinstance(value, str) and value.endswith(".gguf"):
            value = os.path.abspath(os.path.expanduser(value))  # a relative path means the same file anywhere
        if not isinstance(value, str | int | float | bool | list | dict):
            raise InputError(f"a collection stores its options as text: {key}={value!r} cannot be stored; name it")
        out[key] = value
    return out


def identity(model, overlap: int) -> dict[str, Any]:
    """The identity of a ``MetaEOL`` (one layer, or layers it combines) indexing with ``overlap``."""
    if len(model.layers) != 1 and not model.combine_layers:
        raise InputError("a collection stores one vector per chunk: give one --layer, or several with --combine-layers")
    fit = model.postprocess_source(model.layer) if model.postprocess else None
    return {
        "model": model.model_label,
        "templates": model.templates.name,
        "vectors": model._vector_source(),
        "prompts": key_digest(u.key for u in model.units).hex()[:32],
        "method": model.method.cache_name or model.method.name,
        # A combination's layers, in order; one layer as the number it always was (an older collection matches).
        "layer": model.read,
        "preprocess": model.preprocess,
        "max_length": model.max_length,
        "cache_dtype": model.cache_dtype if model.cache is not None else "float32",
        "postprocess": sha256_file(fit)[:32] if fit is not None else None,
        "dim": model.dim,
        "overlap": overlap,
    }


def differing(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The compared fields (:data:`LABELS`, in its order) in which two identities differ."""
    return [key for key in LABELS if stored.get(key) != given.get(key)]


def difference(name: str, stored: dict[str, Any], given: dict[str, Any]) -> str | None:
    """A one-line message naming the first field in which two identities differ, or None."""
    keys = differing(stored, given)
    if not keys:
        return None
    key = keys[0]
    was, now = stored.get(key), given.get(key)
    if key == "vectors":
        was, now = f"{stored.get('model')} ({was})", f"{given.get('model')} ({now})"
    elif key == "prompts":
        was, now = f"{stored.get('templates')} ({was})", f"{given.get('templates')} ({now})"
    return (
        f"collection {name} was made with {LABELS[key]} {was}, not {now}: use the configuration it was made "
        f"with (see `metaeol collections show {name}`), or index into another collection"
    )
