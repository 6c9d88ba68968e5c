"""metaeol-edge: MetaEOL sentence embeddings from quantized GGUF models, offline, on a CPU."""

from .embedder import MetaEOL
from .errors import DownloadError, InputError, MetaEOLError, ModelError, TemplateError
from .prompts import TemplateSet, load_templates, preprocess

__version__ = "0.1.0"
__all__ = [
    "MetaEOL",
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
