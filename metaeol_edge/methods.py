"""Methods: how a sentence becomes prompts, what is read from each, and how the reads combine.

A method is a named object. For each sentence it gives a fixed list of
:class:`Prompt` (the same count and the same ``key`` order for every
sentence), says which token(s) of each prompt to read, and combines the
prompts' states into one vector. Its ``cache_name`` joins the cache key, so
two methods over the same templates never share vectors.

MetaEOL, PromptEOL and a user's template file are all :class:`TemplateMethod`
(registered as ``eol``) configured by a template set: the prompt is the filled
template, the read is its last token, the combination the mean. A new method is
a subclass registered by name::

    from metaeol_edge.methods import TemplateMethod, register_method

    class Mine(TemplateMethod):
        cache_name = "mine/1"
        ...

    register_method("mine", Mine)
    MetaEOL("smollm2-135m", templates="prompteol", method="mine")

Installed packages can register methods too, through the ``metaeol_edge.methods``
entry-point group (name -> factory), found on first lookup of an unknown name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import MetaEOLError
from .prompts import TemplateSet

ENTRY_POINT_GROUP = "metaeol_edge.methods"


@dataclass(frozen=True)
class Prompt:
    """One prompt a method asks a backend to run, and what to read from it.

    ``prefix`` is a fixed start shared by many prompts (a template's
    instruction) that a backend may compute once; it is a hint that never
    changes a vector. ``pool`` is a character span of ``text`` whose tokens'
    states are averaged; ``None`` reads the last token alone (the paper's
    read). ``key`` names the prompt within its method for the cache (the
    template's text), ``label`` for people (the template's task).
    """

    text: str
    key: str
    label: str = ""
    prefix: str = ""
    pool: tuple[int, int] | None = None


@dataclass(frozen=True)
class Unit:
    """A method's n-th prompt, as the cache and reports know it."""

    key: str
    label: str


class Method(ABC):
    """Turns a sentence into prompts and the prompts' states into a vector."""

    name: str = ""
    cache_name: str = ""
    """Joins every cache and post-processing key; "" is reserved for the paper's read."""

    @abstractmethod
    def units(self) -> list[Unit]:
        """The prompts each sentence gets, in order (what ``per_template`` output and the cache index by)."""

    @abstractmethod
    def prompts(self, sentence: str) -> list[Prompt]:
        """The prompts of one (cleaned, pre-processed) sentence, matching :meth:`units` one for one."""

    def combine(self, states: np.ndarray) -> np.ndarray:
        """(N, P, dim) states of N sentences' prompts -> (N, dim) vectors. The mean, by default."""
        return states.mean(axis=1, dtype=np.float32)

    @property
    def description(self) -> str:
        return self.name


class TemplateMethod(Method):
    """MetaEOL, PromptEOL or a user's templates: the last token of each filled template, averaged."""

    name = "eol"
    cache_name = ""

    def __init__(self, templates: TemplateSet) -> None:
        self.templates = templates

    def units(self) -> list[Unit]:
        return [Unit(t.text, t.task) for t in self.templates.templates]

    def prompts(self, sentence: str) -> list[Prompt]:
        return [Prompt(t.render(sentence), key=t.text, label=t.task, prefix=t.prefix) for t in self.templates.templates]

    @property
    def description(self) -> str:
        return self.templates.name


MethodFactory = Callable[[TemplateSet], Method]
_REGISTRY: dict[str, MethodFactory] = {"eol": TemplateMethod}
_entry_points_loaded = False


def register_method(name: str, factory: MethodFactory, *, replace: bool = False) -> None:
    """Make ``factory(templates) -> Method`` available as ``method=name`` (and ``--method name``)."""
    if not name or not isinstance(name, str):
        raise ValueError("a method needs a non-empty name")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise ValueError(f"a method named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = factory


def unregister_method(name: str) -> None:
    if name == "eol":
        raise ValueError("the built-in method 'eol' cannot be removed")
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def make_method(method: str | Method | None, templates: TemplateSet) -> Method:
    """A method instance: given, or made by name from the registry for these templates (default ``eol``)."""
    if isinstance(method, Method):
        made, name = method, method.name or type(method).__name__
    else:
        name = method or "eol"
        if name not in _REGISTRY:
            _load_entry_points()
        if name not in _REGISTRY:
            raise MetaEOLError(f"unknown method {name!r}; registered: {', '.join(method_names())}")
        made = _REGISTRY[name](templates)
    if not isinstance(made, Method):
        raise MetaEOLError(f"method factory {name!r} returned a {type(made).__name__}, not a Method")
    if made.cache_name == "" and type(made) is not TemplateMethod:
        # An empty cache name would hand this method the paper's vectors from the cache.
        raise MetaEOLError(f"method {name!r} must set a non-empty cache_name")
    return made


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()
