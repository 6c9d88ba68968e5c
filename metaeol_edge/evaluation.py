"""SentEval-compatible evaluation data and scores (the data is read where it lies, never shipped).

STS tasks are scored as SimCSE's SentEval 'all' setting, which PromptEOL and
MetaEOL report: Spearman x100 between the cosine of each pair's vectors and the
gold score, over all pairs of a year's subsets together; pairs without gold
are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import CHECKOUT

STS_YEARS = {
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test", ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}
STS_TASKS = (*STS_YEARS, "stsb", "sickr")


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The SentEval data folder: ``explicit``, else ``$METAEOL_DATA``, else ``../shared/senteval`` of a checkout."""
    tried = []
    for candidate, why in (
        (explicit, "--data"),
        (os.environ.get("METAEOL_DATA"), "$METAEOL_DATA"),
        (CHECKOUT.parent / "shared" / "senteval", "beside the checkout"),
    ):
        if candidate is None:
            continue
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path
        tried.append(f"{path} ({why})")
        if why != "beside the checkout":
            break  # an explicit choice that does not exist is an error, not a fallback
    raise InputError(
        "SentEval data not found; looked in: "
        + ("; ".join(tried) or "nowhere")
        + ". Give --data or set METAEOL_DATA to a folder in SentEval's layout (STS/, SICK/, MR/, ...)"
    )


@dataclass(frozen=True)
class STSData:
    name: str
    a: list[str]
    b: list[str]
    gold: np.ndarray

    def __len__(self) -> int:
        return len(self.gold)

    def sentences(self) -> list[str]:
        """Distinct sentences, in first-seen order."""
        return list(dict.fromkeys(s for pair in zip(self.a, self.b, strict=True) for s in pair))


def _read(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"evaluation file {path} is missing")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def load_sts(task: str, root: Path, split: str = "test", limit: int | None = None) -> STSData:
    """An STS task's pairs and gold scores; ``split`` applies to stsb and sickr (train, dev, test)."""
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    if task in STS_YEARS:
        folder, subsets = STS_YEARS[task]
        for subset in subsets:
            inputs = _read(root / "STS" / folder / f"STS.input.{subset}.txt")
            scores = _read(root / "STS" / folder / f"STS.gs.{subset}.txt")
            for line, score in zip(inputs, scores, strict=False):
                if not score.strip():
                    continue  # no gold for this pair
                s1, s2 = line.split("\t")[:2]
                a.append(s1.strip())
                b.append(s2.strip())
                gold.append(float(score))
    elif task == "stsb":
        for line in _read(root / "STS" / "STSBenchmark" / f"sts-{split}.csv"):
            cols = line.split("\t")
            if len(cols) >= 7:
                a.append(cols[5].strip())
                b.append(cols[6].strip())
                gold.append(float(cols[4]))
    elif task == "sickr":
        name = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}[split]
        for line in _read(root / "SICK" / name)[1:]:  # a header line first
            cols = line.split("\t")
            if len(cols) >= 4:
                a.append(cols[1].strip())
                b.append(cols[2].strip())
                gold.append(float(cols[3]))
    else:
        raise InputError(f"unknown STS task {task!r}; known: {', '.join(STS_TASKS)}")
    if limit:
        a, b, gold = a[:limit], b[:limit], gold[:limit]
    return STSData(task, a, b, np.asarray(gold, dtype=np.float64))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    rx, ry = rankdata(np.asarray(x)), rankdata(np.asarray(y))
    rx -= rx.mean()
    ry -= ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def pair_cosines(data: STSData, vectors: dict[str, np.ndarray]) -> np.ndarray:
    va = np.stack([vectors[s] for s in data.a]).astype(np.float64)
    vb = np.stack([vectors[s] for s in data.b]).astype(np.float64)
    return (va * vb).sum(1) / np.maximum(np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1), 1e-30)


def score_sts(data: STSData, encode: Callable[[list[str]], np.ndarray]) -> float:
    """Spearman x100 of the pairs' cosines against gold, embedding each distinct sentence once."""
    sentences = data.sentences()
    vectors = dict(zip(sentences, encode(sentences), strict=True))
    return 100.0 * spearman(pair_cosines(data, vectors), data.gold)


def run_sts(
    data: STSData, encode: Callable[[list[str]], np.ndarray], save_dir: Path | None = None
) -> dict[str, float | int]:
    """Score one STS task; with ``save_dir``, write the vectors and the pair order to recompute it.

    ``save_dir/TASK.npy`` holds one float32 row per distinct sentence and
    ``TASK.pairs.tsv`` one line per pair: row of a, row of b, gold score.
    """
    import time

    sentences = data.sentences()
    t0 = time.perf_counter()
    vectors = np.asarray(encode(sentences), dtype=np.float32)
    seconds = time.perf_counter() - t0
    by_text = dict(zip(sentences, vectors, strict=True))
    score = 100.0 * spearman(pair_cosines(data, by_text), data.gold)
    if save_dir is not None:
        from .files import atomic_write

        save_dir.mkdir(parents=True, exist_ok=True)
        row = {s: i for i, s in enumerate(sentences)}
        with atomic_write(save_dir / f"{data.name}.npy") as f:
            np.save(f, vectors)
        lines = [f"{row[a]}\t{row[b]}\t{g!r}\n" for a, b, g in zip(data.a, data.b, data.gold.tolist(), strict=True)]
        with atomic_write(save_dir / f"{data.name}.pairs.tsv") as f:
            f.write("".join(lines).encode("ascii"))
    return {"score": score, "pairs": len(data), "sentences": len(sentences), "seconds": seconds}


def rescore_saved(save_dir: Path, task: str) -> float:
    """Spearman x100 recomputed from what :func:`run_sts` saved, with nothing else."""
    vectors = np.load(save_dir / f"{task}.npy").astype(np.float64)
    pairs = np.loadtxt(save_dir / f"{task}.pairs.tsv", delimiter="\t", ndmin=2)
    a, b = vectors[pairs[:, 0].astype(int)], vectors[pairs[:, 1].astype(int)]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100.0 * spearman(cos, pairs[:, 2])
