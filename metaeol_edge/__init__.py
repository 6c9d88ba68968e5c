"""metaeol-edge: MetaEOL sentence embeddings from quantized GGUF models, offline, on a CPU.

The layers, each in its own module: ``methods`` (sentence -> prompts -> one
vector) -> ``backends`` (prompts -> hidden states: ``engine`` for llama.cpp,
``reference`` for PyTorch, ``naive``) -> ``cache`` (stored prompt vectors, keyed
by ``identity``) -> ``embedder`` (the recipe that streams sentences through
them) -> faces (``cli``).
"""

from .embedder import Embedder, EncodeStats, MetaEOL, Truncation
from .errors import DownloadError, InputError, MetaEOLError, ModelError, TemplateError
from .methods import Method, Prompt, TemplateMethod, Unit, method_names, register_method
from .prompts import TemplateSet, load_templates, preprocess

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
