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


# None stays "a NoneType" (the text tests and users already match); the server says "null".
_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", bytes: "bytes"}


def kind_of(value: object) -> str:
    """A value's type as an error message says it: "an integer", "a list", "an OrderedDict"."""
    if type(value) in _KINDS:
        return _KINDS[type(value)]
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
