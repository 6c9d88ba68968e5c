"""metaeol-edge: MetaEOL sentence embeddings from quantized GGUF models, offline, on a CPU.

Packages by concern, each importing only from those below it (import-linter
checks it: the ``[tool.importlinter]`` contract in pyproject.toml):

* ``faces``: what users call: ``cli``, ``server``, ``bulk``, ``integrations``;
* ``evaluation``: SentEval tasks and measurements;
* ``core``: the recipe (``embedder``), its ``cache`` and ``identity``,
  post-processing, presets, and the yardstick recipes;
* ``backends``: prompts -> hidden states (``engine`` for llama.cpp, ``torch``,
  ``naive``, ``fake``);
* ``methods``: sentence -> prompts -> one vector (templates, layers);
  ``models``: a model reference -> a local file (registry, found, hub, store);
* ``errors``, ``files``, ``llamacpp``: the ground floor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metaeol_edge import _aliases

if TYPE_CHECKING:
    from metaeol_edge.core.embedder import Embedder, EncodeStats, MetaEOL, Truncation
    from metaeol_edge.errors import DownloadError, InputError, MetaEOLError, ModelError, TemplateError
    from metaeol_edge.methods import Method, Prompt, TemplateMethod, Unit, method_names, register_method
    from metaeol_edge.methods.prompts import TemplateSet, load_templates, preprocess

_aliases.install()  # 0.2's module names (metaeol_edge.embedder, ...) keep working

# The public names load on first use (PEP 562): a process that imports one module (a cache opener, a
# worker, ``metaeol --version``) does not pay for the embedder and everything under it.
_LAZY = {
    "metaeol_edge.core.embedder": ("Embedder", "EncodeStats", "MetaEOL", "Truncation"),
    "metaeol_edge.errors": ("DownloadError", "InputError", "MetaEOLError", "ModelError", "TemplateError"),
    "metaeol_edge.methods": ("Method", "Prompt", "TemplateMethod", "Unit", "method_names", "register_method"),
    "metaeol_edge.methods.prompts": ("TemplateSet", "load_templates", "preprocess"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> object:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'metaeol_edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__version__ = "0.2.0"
__all__ = [
    "MetaEOL",
    "Embedder",
    "EncodeStats",
    "Truncation",
    "Method",
    "TemplateMethod",
    "Prompt",
    "Unit",
    "register_method",
    "method_names",
    "MetaEOLError",
    "InputError",
    "ModelError",
    "DownloadError",
    "TemplateError",
    "TemplateSet",
    "load_templates",
    "preprocess",
    "__version__",
]
