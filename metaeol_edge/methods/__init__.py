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

from metaeol_edge.errors import MetaEOLError, kind_of
from metaeol_edge.methods.prompts import Template, TemplateSet

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
    ``rewrite``: a hidden-state rewrite during the forward pass (Token
    Prepending, :class:`Rewrite`); ``None`` for a plain forward pass.
    """

    text: str
    key: str
    label: str = ""
    prefix: str = ""
    pool: tuple[int, int] | None = None
    rewrite: Rewrite | None = None


@dataclass(frozen=True)
class Rewrite:
    """Token Prepending (Fu et al., arXiv 2412.11556): overwrite one token's state with the last token's.

    ``span`` is the character span of the placeholder token in the prompt's
    text (it must be exactly one token). For each ``k`` in ``[start, stop)``,
    ``hidden_states[k]`` (the output of block k, the input of 0-based decoder
    layer k; llama.cpp's ``l_out-(k-1)``) has the placeholder's row replaced by
    the prompt's last token's row before the next block reads it. This is the
    authors' ``tp_starting_index`` / ``tp_exiting_index`` (their decoder-layer
    loop index, exit exclusive); ``start == stop`` rewrites nothing.
    """

    span: tuple[int, int]
    start: int
    stop: int


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

    def check_depth(self, n_layer: int) -> None:  # noqa: B027 - most methods run on any model
        """Refuse, with a clear error, a model of ``n_layer`` blocks this method cannot run on."""


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


TP_PLACEHOLDER = " X"
"""Token Prepending's placeholder: one ordinary token, since a GGUF model cannot get a new one.

The authors add a token ``<PST>`` with a random embedding; its embedding only
matters in the blocks before the first rewrite. " X" (a letters-only word, so a
pre-token of its own in byte-level BPE, between the template's " :" and the
sentence's opening ' "') is one token in smollm2 (2273) and gemma3 (1684), never
merged with a neighbour (checked for every prompt: :func:`placeholder_row`),
and close to meaningless: a generic name for "something".
"""
TP_START, TP_STOP = 1, 4
"""Default rewrite range: blocks 1..3. The authors' configs rewrite from layer 1 up to an exit of 3 to 7 on
28- to 42-layer models (LLaMA-2-7B 7, LLaMA-3-8B 3, Qwen2-7B and Gemma-2-9B 6), 10-20% of the depth; 3 of
30 blocks on smollm2-135m and 3 of 18 on gemma3-270m lie in that range. Not tuned here."""


class TokenPrepending(TemplateMethod):
    """Token Prepending (Fu et al., arXiv 2412.11556) over a template set: registered as ``tp``.

    Each template gets a placeholder token just before the sentence's opening
    quote (``this sentence : X "..." means in one word:"``, the authors'
    ``this sentence : <PST> "..."``). In blocks ``start..stop-1`` the
    placeholder's hidden state is replaced by the last token's (:class:`Rewrite`),
    so the sentence's tokens can attend to a summary of the whole prompt. The
    read (last token) and the combination (mean) are :class:`TemplateMethod`'s.
    ``MetaEOL(..., method=TokenPrepending(load_templates("prompteol"), start=1, stop=7))``.
    """

    name = "tp"

    def __init__(
        self, templates: TemplateSet, start: int = TP_START, stop: int = TP_STOP, placeholder: str = TP_PLACEHOLDER
    ) -> None:
        for what, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise MetaEOLError(f"token prepending: {what} must be an integer block number, not {v!r}")
        if not 1 <= start <= stop:
            raise MetaEOLError(
                f"token prepending: layers {start}:{stop} must satisfy 1 <= start <= stop (blocks start..stop-1 "
                "are rewritten; start 0 would rewrite the input embedding, which the placeholder already is)"
            )
        if not placeholder.strip() or placeholder != placeholder.rstrip():
            raise MetaEOLError(f"token prepending: placeholder {placeholder!r} must be a word without trailing space")
        super().__init__(templates)
        self.start, self.stop, self.placeholder = start, stop, placeholder
        self.cache_name = f"tp/1:{start}-{stop}"
        self._parts = [self._split(t) for t in templates.templates]

    def _split(self, t: Template) -> tuple[Template, str]:
        """(template with the placeholder inserted, its text before the placeholder)."""
        before, after = t.text.split(t.placeholder, 1)
        quote = before[-1] if before[-1:] in ('"', "'") else ""  # the sentence's opening quote
        head = (before[:-1] if quote else before).rstrip()
        text = head + self.placeholder + " " + quote + t.placeholder + after
        return Template(t.task, text, t.placeholder, t.meta_task), head

    def units(self) -> list[Unit]:
        return [Unit(t.text, t.task) for t, _ in self._parts]

    def prompts(self, sentence: str) -> list[Prompt]:
        out = []
        for t, head in self._parts:
            text = t.render(sentence)
            lead = len(t.text) - len(t.text.lstrip())  # render() strips the filled template
            a = len(head) - lead
            span = (a, a + len(self.placeholder))
            assert text[span[0] : span[1]] == self.placeholder
            rewrite = Rewrite(span, self.start, self.stop)
            out.append(Prompt(text, key=t.text, label=t.task, prefix=text[: span[0]], rewrite=rewrite))
        return out

    def check_depth(self, n_layer: int) -> None:
        if self.stop > n_layer:
            raise MetaEOLError(
                f"token prepending: stop {self.stop} is over the model's {n_layer} blocks (blocks "
                f"start..stop-1 are rewritten, so stop can be at most {n_layer})"
            )

    @property
    def description(self) -> str:
        return f"{self.templates.name}+tp{self.start}:{self.stop}"

    def __repr__(self) -> str:
        # Stable across runs: a bulk job's identity (job.json) holds the method's str().
        return (
            f"TokenPrepending({self.templates.name!r} from {self.templates.source!r}, start={self.start}, "
            f"stop={self.stop}, placeholder={self.placeholder!r})"
        )


MethodFactory = Callable[[TemplateSet], Method]
_REGISTRY: dict[str, MethodFactory] = {"eol": TemplateMethod, "tp": TokenPrepending}
_entry_points_loaded = False


def register_method(name: str, factory: MethodFactory, *, replace: bool = False) -> None:
    """Make ``factory(templates) -> Method`` available as ``method=name`` (and ``--method name``)."""
    if not name or not isinstance(name, str):
        raise ValueError("a method needs a non-empty name")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise ValueError(f"a method named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = factory


def unregister_method(name: str) -> None:
    if name in ("eol", "tp"):
        raise ValueError(f"the built-in method {name!r} cannot be removed")
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
        raise MetaEOLError(f"method factory {name!r} returned {kind_of(made)}, not a Method")
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
