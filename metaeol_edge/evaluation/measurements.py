"""What ``metaeol bench`` measured on this machine, kept in the store, and the advice drawn from it.

Speed depends on the CPU (on some, F16 or F32 weights run faster than 4-bit
ones), so the advice comes from measurements taken here, never from a table
shipped with the package. One record per model, quantization level and
template set: the latest run replaces the earlier one.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from metaeol_edge.files import atomic_write

if TYPE_CHECKING:
    from metaeol_edge.evaluation import STSData


@dataclass(frozen=True)
class Measurement:
    model: str  # registry id or file path
    level: str  # "shipped" or a quantization level
    templates: str
    sentences_per_s: float
    stsb: float  # STS-B test Spearman x100 on `pairs` pairs
    pairs: int
    size_bytes: int
    machine: str = ""
    when: float = 0.0


def path(store: Path) -> Path:
    return store / "measurements.json"


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or platform.platform()}"


def load(store: Path) -> list[Measurement]:
    try:
        rows = json.loads(path(store).read_text(encoding="utf-8"))
        return [Measurement(**row) for row in rows]
    except (OSError, ValueError, TypeError):
        return []  # none yet, or written by another version: measure again


def record(store: Path, new: list[Measurement]) -> None:
    keep = {(m.model, m.level, m.templates): m for m in load(store)}
    for m in new:
        keep[(m.model, m.level, m.templates)] = Measurement(**{**asdict(m), "machine": machine(), "when": time.time()})
    with atomic_write(path(store)) as f:
        f.write(json.dumps([asdict(m) for m in keep.values()], indent=1).encode("utf-8"))


TOLERANCE = 0.5
"""Spearman points below which two scores count as equal: differences of a few tenths
are noise on a few hundred pairs (the issue's bar for 'as accurate as the reference')."""


def advice(rows: list[Measurement], model: str, level: str = "shipped", tolerance: float = TOLERANCE) -> str | None:
    """A line saying which other level is faster here and no less accurate (within ``tolerance``), if one is."""
    mine = [m for m in rows if m.model == model and m.machine in ("", machine())]
    for chosen in [m for m in mine if m.level == level]:
        better = [
            m
            for m in mine
            if m.level != level
            and m.templates == chosen.templates
            and m.pairs == chosen.pairs
            and m.sentences_per_s > chosen.sentences_per_s
            and m.stsb >= chosen.stsb - tolerance
        ]
        if better:
            best = max(better, key=lambda m: m.sentences_per_s)
            return (
                f"{model}: {best.level} ran {best.sentences_per_s / chosen.sentences_per_s:.2f}x faster than {level} "
                f"on this machine and scored as well (STS-B {best.stsb:.2f} vs {chosen.stsb:.2f} on {best.pairs} "
                f"pairs, {chosen.templates}; within {tolerance}); use it with --level {best.level}"
            )
    return None


def bench(
    open_model: Callable[[str, bool], AbstractContextManager],
    model_id: str,
    templates: str,
    levels: Sequence[str],
    data: STSData,
    n_timed: int,
    on_row: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Time and score each quantization level here, as ``metaeol bench`` does.

    ``open_model(level, cache)`` gives a model (a context manager with
    ``encode`` and ``model_path``). Speed: the first ``n_timed`` distinct
    sentences of ``data`` with the cache off, after one untimed warm-up
    sentence (the load). Accuracy: STS-B Spearman x100 on ``data``'s pairs.
    """
    from metaeol_edge.evaluation import run_sts

    timed = data.sentences()[:n_timed]
    rows = []
    for level in levels:
        with open_model(level, False) as model:
            model.encode(timed[:1], show_progress_bar=False)  # load outside the timing
            t0 = time.perf_counter()
            model.encode(timed, show_progress_bar=False)
            speed = len(timed) / (time.perf_counter() - t0)
            size = model.model_path.stat().st_size
        with open_model(level, True) as model:
            score = run_sts(data, lambda s, m=model: m.encode(s, show_progress_bar=True))["score"]
        row = Measurement(model_id, level, templates, speed, float(score), len(data), size)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
