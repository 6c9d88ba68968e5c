"""Errors a user can act on. Each carries a message that says what was wrong and where."""


class MetaEOLError(Exception):
    """Base class for every error metaeol-edge raises on purpose."""


class InputError(MetaEOLError, ValueError):
    """A sentence or an input file cannot be embedded as given."""


class TemplateError(MetaEOLError, ValueError):
    """A template set is missing or invalid."""


class ModelError(MetaEOLError):
    """A model id is unknown, or a model file is missing, truncated or not GGUF."""


class DownloadError(ModelError):
    """A model could not be fetched from any of its sources."""
