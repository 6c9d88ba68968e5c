"""Markdown tables for the benchmark reports."""

from __future__ import annotations


def cell(x: float | None, spec: str = ".2f") -> str:
    """A number as the reports print it; '-' where there is none."""
    return "-" if x is None else format(x, spec)


def table(head: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    """Table lines: the first ``text_columns`` columns left-aligned, the numbers right-aligned."""
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(head))) + "|",
    ]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
