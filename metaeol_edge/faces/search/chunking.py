"""Text into chunks that fit the configuration's ``max_length``, cut at paragraphs, then sentences, then tokens.

A chunk is a span of the source text (its first and last line are kept), and
every chunk is checked the way the embedder checks a sentence: each of the
method's prompts, filled with the chunk, must fit ``max_length`` tokens. So no
chunk is ever truncated by the embedder; text too long for one chunk is split,
never cut. ``overlap`` repeats up to that many tokens of the end of a chunk (whole
paragraphs or sentences) at the start of the next.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

from metaeol_edge.errors import InputError
from metaeol_edge.prompts import preprocess

MARGIN = 4  # tokens kept free beside the measured template overhead (a preprocessed '.', BOS/EOS)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;。！？])\s+|\s*\n\s*")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class Chunk:
    """A span of a text: the stripped text, its first and last line (1-based), and where it starts."""

    text: str
    line: int
    line_end: int
    start: int = 0  # character offset in the source text


@dataclass(frozen=True)
class Budget:
    """How much text a chunk may hold: ``count`` tokens of bare text, ``tokens`` at most, and the exact
    check ``fits`` (every prompt of the method, filled, within ``max_length``)."""

    count: Callable[[str], int]
    fits: Callable[[str], bool]
    tokens: int
    overlap: int = 0

    @classmethod
    def for_model(cls, model, overlap: int = 0) -> Budget:
        """The budget of a ``MetaEOL``: its tokenizer, its method's prompts and its ``max_length``."""
        if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
            raise InputError(f"overlap must be a number of tokens, 0 or more, not {overlap!r}")
        backend = model.backend  # the tokenizer: loads the model once

        def count(text: str) -> int:
            return len(backend.tokenize(text, add_special=False))

        def need(text: str) -> int:
            text = preprocess(text) if model.preprocess else text
            return max(len(backend.tokenize(p.text)) for p in model.method.prompts(text))

        probe = "A short sentence to measure the templates with."
        overhead = need(probe) - count(preprocess(probe) if model.preprocess else probe)
        tokens = model.max_length - overhead - MARGIN
        if tokens < 8:
            raise InputError(
                f"the templates take {overhead} of max_length {model.max_length} tokens, leaving no room for text: "
                "index with a larger --max-length"
            )
        if overlap >= tokens // 2:
            most = tokens // 2 - 1
            raise InputError(f"overlap {overlap} is over half a chunk ({tokens} tokens): give at most {most}")
        return cls(count, lambda text: need(text) <= model.max_length, tokens, overlap)


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int


def split_text(text: str, budget: Budget) -> list[Chunk]:
    """The chunks of ``text``, in order; blank text gives none. NUL characters read as spaces."""
    text = text.replace("\x00", " ")
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    out = []
    for start, end in _chunk_spans(text, 0, len(text), budget, budget.tokens):
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        start, stripped = start + lead, piece.strip()
        line = bisect.bisect_left(newlines, start) + 1
        line_end = bisect.bisect_left(newlines, start + len(stripped) - 1) + 1
        out.append(Chunk(stripped, line, line_end, start))
    return out


def _chunk_spans(text: str, lo: int, hi: int, budget: Budget, tokens: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of text[lo:hi] at ``tokens`` per chunk, every one checked with ``fits``."""
    units: list[_Unit] = []
    for start, end in _pieces(text, lo, hi, _PARAGRAPH_BREAK):
        units.extend(_fit_units(text, start, end, budget, tokens))
    spans = []
    for start, end in _pack(units, tokens, budget.overlap):
        if budget.fits(text[start:end]):
            spans.append((start, end))
            continue
        # Token counts are not exactly additive (a merge at a join): split this one finer.
        smaller = tokens * 3 // 4
        if smaller < 1 or end - start <= 1:
            raise InputError("the templates alone exceed max_length: index with a larger --max-length")
        spans.extend(_chunk_spans(text, start, end, budget, smaller))
    return spans


def _pieces(text: str, lo: int, hi: int, breaks: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans of text[lo:hi] between matches of ``breaks``, each with something other than whitespace."""
    spans, at = [], lo
    for m in breaks.finditer(text, lo, hi):
        if text[at : m.start()].strip():
            spans.append((at, m.start()))
        at = m.end()
    if text[at:hi].strip():
        spans.append((at, hi))
    return spans


def _fit_units(text: str, lo: int, hi: int, budget: Budget, tokens: int) -> list[_Unit]:
    """text[lo:hi] as units of at most ``tokens``: whole, else its sentences (and lines), else token runs."""
    n = budget.count(text[lo:hi])
    if n <= tokens:
        return [_Unit(lo, hi, n)]
    units = []
    sentences = _pieces(text, lo, hi, _SENTENCE_BREAK)
    if len(sentences) == 1 and sentences[0] == (lo, hi):
        return _hard_split(text, lo, hi, budget, tokens)
    for start, end in sentences:
        n = budget.count(text[start:end])
        units.extend([_Unit(start, end, n)] if n <= tokens else _hard_split(text, start, end, budget, tokens))
    return units


def _hard_split(text: str, lo: int, hi: int, budget: Budget, tokens: int) -> list[_Unit]:
    """A sentence longer than a chunk, in runs of at most ``tokens``, cut at a space where there is one."""
    units = []
    while lo < hi:
        if budget.count(text[lo:hi]) <= tokens:
            units.append(_Unit(lo, hi, budget.count(text[lo:hi])))
            break
        # The longest prefix that fits, by bisection on characters (a token covers at least one).
        good, bad = lo + 1, min(hi, lo + tokens * 16 + 1)
        while budget.count(text[lo:bad]) <= tokens and bad < hi:
            bad = min(hi, lo + (bad - lo) * 2)
        while bad - good > 1:
            mid = (good + bad) // 2
            if budget.count(text[lo:mid]) <= tokens:
                good = mid
            else:
                bad = mid
        cut = good
        space = max((m.start() for m in _SPACE.finditer(text, lo + (good - lo) // 2, good)), default=None)
        if space is not None and space > lo:
            cut = space
        units.append(_Unit(lo, cut, budget.count(text[lo:cut])))
        lo = cut
        while lo < hi and text[lo].isspace():
            lo += 1
    return units


def _pack(units: list[_Unit], tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Consecutive units joined into spans of at most ``tokens``; with ``overlap``, each span after the
    first starts with the last units (up to that many tokens) of the one before."""
    spans: list[tuple[int, int]] = []
    current: list[_Unit] = []
    size = 0
    for unit in units:
        if current and size + unit.tokens > tokens:
            spans.append((current[0].start, current[-1].end))
            carry: list[_Unit] = []
            kept = 0
            for u in reversed(current):
                if kept + u.tokens > overlap or kept + u.tokens + unit.tokens > tokens:
                    break
                carry.insert(0, u)
                kept += u.tokens
            current, size = carry, kept
        current.append(unit)
        size += unit.tokens
    if current:  # it always holds a unit the span before did not
        spans.append((current[0].start, current[-1].end))
    return spans
