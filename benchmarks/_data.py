"""Where the benchmarks find their sentences: SentEval's STS-B, never committed here."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def senteval_dir() -> Path:
    return Path(os.environ.get("METAEOL_DATA", REPO.parent / "shared" / "senteval"))


def stsb_sentences(split: str = "test", limit: int | None = None) -> list[str]:
    """Distinct STS-B sentences of a split, in file order."""
    path = senteval_dir() / "STS" / "STSBenchmark" / f"sts-{split}.csv"
    if not path.is_file():
        raise SystemExit(f"STS-B not found at {path}: set METAEOL_DATA to a SentEval data folder")
    seen: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            for s in cols[5:7]:
                seen.setdefault(s.strip(), None)
    out = list(seen)
    return out[:limit] if limit else out
