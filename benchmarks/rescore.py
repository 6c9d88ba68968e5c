"""Every score recomputed from saved embeddings alone, so anyone can check a report.

    python benchmarks/rescore.py DIR [DIR ...] [--jobs N]

Walks each DIR for what ``--save-embeddings`` wrote (``metaeol eval``,
``benchmarks/accuracy.py``, ``benchmarks/reference.py``): ``TASK.npy`` beside
``TASK.pairs.tsv`` (STS: row of a, row of b, gold) or ``TASK.items.tsv``
(transfer tasks: split, row of a, row of b or -1, label), and prints one line a
task with the score ``metaeol_edge.evaluation.rescore_saved`` computes from those
files: cosine and Spearman for STS, the same logistic-regression protocol for
the transfer tasks. Nothing else is read: no model, no cache, no dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metaeol_edge.evaluation import STS_TASKS, TRANSFER_TASKS, rescore_saved


def saved_tasks(root: Path) -> list[tuple[Path, str]]:
    """(folder, task) for every saved task under ``root``, in a stable order."""
    found = []
    for npy in sorted(root.rglob("*.npy")):
        task = npy.stem
        order = ".pairs.tsv" if task in STS_TASKS else ".items.tsv" if task in TRANSFER_TASKS else None
        if order and (npy.parent / f"{task}{order}").exists():
            found.append((npy.parent, task))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--jobs", type=int, default=-1, help="processes for the transfer tasks' classifier fits")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        ap.error(f"not a folder: {', '.join(missing)}")
    found = list(dict.fromkeys(x for root in args.dirs for x in saved_tasks(root.resolve())))
    if not found:
        where = ", ".join(map(str, args.dirs))
        print(f"no saved embeddings (TASK.npy beside TASK.pairs.tsv or TASK.items.tsv) under {where}", file=sys.stderr)
        return 1
    for folder, task in found:
        score = rescore_saved(folder, task, n_jobs=args.jobs)
        print(f"{folder}\t{task}\t{score:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
