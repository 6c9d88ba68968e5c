"""SentEval-compatible evaluation data and scores (the data is read where it lies, never shipped).

STS tasks are scored as SimCSE's SentEval 'all' setting, which PromptEOL and
MetaEOL report: Spearman x100 between the cosine of each pair's vectors and the
gold score, over all pairs of a year's subsets together; pairs without gold
are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaeol_edge.errors import InputError
from metaeol_edge.files import CHECKOUT, atomic_write

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
    data: STSData,
    encode: Callable[[list[str]], np.ndarray],
    save_dir: Path | None = None,
    save_dtype: type[np.floating] = np.float32,
) -> dict[str, float | int]:
    """Score one STS task; with ``save_dir``, write the vectors and the pair order to recompute it.

    ``save_dir/TASK.npy`` holds one row per distinct sentence (``save_dtype``:
    float16 halves the files; the score is then computed from the rounded
    vectors, so the files give back the same number) and ``TASK.pairs.tsv`` one
    line per pair: row of a, row of b, gold score.
    """
    sentences = data.sentences()
    t0 = time.perf_counter()
    vectors = np.asarray(encode(sentences), dtype=np.float32)
    seconds = time.perf_counter() - t0
    if save_dir is not None and save_dtype != np.float32:
        vectors = vectors.astype(save_dtype).astype(np.float32)
    by_text = dict(zip(sentences, vectors, strict=True))
    score = 100.0 * spearman(pair_cosines(data, by_text), data.gold)
    if save_dir is not None:
        _save_vectors(save_dir, data.name, vectors.astype(save_dtype))
        row = {s: i for i, s in enumerate(sentences)}
        lines = [f"{row[a]}\t{row[b]}\t{g!r}\n" for a, b, g in zip(data.a, data.b, data.gold.tolist(), strict=True)]
        with atomic_write(save_dir / f"{data.name}.pairs.tsv") as f:
            f.write("".join(lines).encode("ascii"))
    return {"score": score, "pairs": len(data), "sentences": len(sentences), "seconds": seconds}


def _save_vectors(save_dir: Path, task: str, vectors: np.ndarray) -> None:
    with atomic_write(save_dir / f"{task}.npy") as f:  # atomic_write makes the folder
        np.save(f, vectors)


def rescore_saved(save_dir: Path, task: str, n_jobs: int | None = 1) -> float:
    """The score recomputed from what :func:`run_sts` or :func:`run_transfer` saved, with nothing else."""
    vectors = np.load(save_dir / f"{task}.npy").astype(np.float64)
    if task in TRANSFER_TASKS:
        return score_transfer(_saved_items(save_dir / f"{task}.items.tsv", task), vectors, n_jobs=n_jobs)
    pairs = np.loadtxt(save_dir / f"{task}.pairs.tsv", delimiter="\t", ndmin=2)
    a, b = vectors[pairs[:, 0].astype(int)], vectors[pairs[:, 1].astype(int)]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100.0 * spearman(cos, pairs[:, 2])


# -- transfer tasks ---------------------------------------------------------------

TRANSFER_TASKS = ("mr", "cr", "mpqa", "sst2", "trec", "mrpc")
CV_TASKS = {"mr": ("MR", "rt-polarity"), "cr": ("CR", "custrev"), "mpqa": ("MPQA", "mpqa")}
C_GRID = tuple(2.0**t for t in range(-2, 4))  # SentEval's logistic-regression grid


def task_names(text: str) -> list[str]:
    """Comma-separated task names and the groups sts, transfer, all -> task names, in order, once each."""
    groups = {"sts": STS_TASKS, "transfer": TRANSFER_TASKS, "all": STS_TASKS + TRANSFER_TASKS}
    tasks = [t.strip().lower() for t in text.split(",") if t.strip()]
    tasks = list(dict.fromkeys(x for t in tasks for x in groups.get(t, [t])))
    unknown = [t for t in tasks if t not in STS_TASKS + TRANSFER_TASKS]
    if not tasks or unknown:
        known = ", ".join((*STS_TASKS, *TRANSFER_TASKS, *groups))
        raise InputError(f"unknown task(s) {', '.join(unknown) or '(none)'}; known: {known}")
    return tasks


@dataclass(frozen=True)
class TransferData:
    """Sentences (or sentence pairs, for MRPC) and labels, per split ('all' for 10-fold tasks).

    Scoring uses the same shape with each sentence replaced by its row in an
    array of vectors (:func:`_rows`, :func:`_saved_items`).
    """

    name: str
    splits: dict[str, tuple[list[str] | list[int], list[str] | list[int] | None, np.ndarray]]

    def sentences(self) -> list[str]:
        seen: dict[str, None] = {}
        for a, b, _ in self.splits.values():
            for s in a + (b or []):
                seen.setdefault(s, None)
        return list(seen)


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Non-empty lines split on newlines only (MR holds U+0085, which str.splitlines would split on)."""
    if not path.is_file():
        raise InputError(f"evaluation file {path} is missing")
    text = path.read_bytes().decode(encoding, errors="replace")
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


def load_transfer(task: str, root: Path, limit: int | None = None) -> TransferData:
    """A SentEval transfer task; ``limit`` keeps the first N items of each split (for quick runs)."""

    def cut(a: list[str], b: list[str] | None, y: list) -> tuple[list[str], list[str] | None, np.ndarray]:
        if limit:
            a, b, y = a[:limit], (b[:limit] if b is not None else None), y[:limit]
        return a, b, np.asarray(y)

    if task in CV_TASKS:
        folder, stem = CV_TASKS[task]
        pos = _lines(root / folder / f"{stem}.pos", "latin-1")
        neg = _lines(root / folder / f"{stem}.neg", "latin-1")
        # Interleave so that a --limit keeps both classes.
        a, y = [], []
        for i in range(max(len(pos), len(neg))):
            for side, label in ((pos, 1), (neg, 0)):
                if i < len(side):
                    a.append(side[i])
                    y.append(label)
        return TransferData(task, {"all": cut(a, None, y)})
    if task == "sst2":
        splits = {}
        for split in ("train", "dev", "test"):
            rows = [ln.rsplit("\t", 1) for ln in _lines(root / "SST" / "binary" / f"sentiment-{split}")]
            splits[split] = cut([r[0].strip() for r in rows], None, [int(r[1]) for r in rows])
        return TransferData(task, splits)
    if task == "trec":
        splits = {}
        for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
            rows = [ln.split(" ", 1) for ln in _lines(root / "TREC" / name, "latin-1")]
            splits[split] = cut([r[1] for r in rows], None, [r[0].split(":")[0] for r in rows])
        return TransferData(task, splits)
    if task == "mrpc":
        splits = {}
        for split in ("train", "test"):
            rows = [ln.split("\t") for ln in _lines(root / "MRPC" / f"msr_paraphrase_{split}.txt", "utf-8-sig")[1:]]
            splits[split] = cut([r[3] for r in rows], [r[4] for r in rows], [int(r[0]) for r in rows])
        return TransferData(task, splits)
    raise InputError(f"unknown transfer task {task!r}; known: {', '.join(TRANSFER_TASKS)}")


def _sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise InputError("transfer tasks need scikit-learn: pip install 'metaeol-edge[eval]'") from exc
    return LogisticRegression, StratifiedKFold, make_pipeline, StandardScaler


def _classifier(c: float):
    logreg, _, pipeline, scaler = _sklearn()
    # Standardized features: LLM hidden states differ in scale by orders of magnitude.
    return pipeline(scaler(), logreg(C=c, max_iter=2000))


def _rows(data: TransferData) -> TransferData:
    """The same task with each sentence replaced by its row in ``data.sentences()``."""
    row = {s: i for i, s in enumerate(data.sentences())}
    return TransferData(
        data.name,
        {
            k: ([row[s] for s in a], None if b is None else [row[s] for s in b], y)
            for k, (a, b, y) in data.splits.items()
        },
    )


def _saved_items(path: Path, task: str) -> TransferData:
    """What :func:`run_transfer` wrote to ``TASK.items.tsv``: split, row of a, row of b (-1: none), label."""
    splits: dict[str, tuple[list[int], list[int] | None, list[str]]] = {}
    for line in path.read_text("utf-8").splitlines():
        split, a, b, label = line.split("\t")
        rows_a, rows_b, labels = splits.setdefault(split, ([], None if b == "-1" else [], []))
        rows_a.append(int(a))
        if rows_b is not None:
            rows_b.append(int(b))
        labels.append(label)
    # Labels come back as the loader made them: integers where they were (all but TREC's).
    numeric = all(y.lstrip("-").isdigit() for _, _, ys in splits.values() for y in ys)
    return TransferData(
        task, {k: (a, b, np.asarray([int(v) for v in y] if numeric else y)) for k, (a, b, y) in splits.items()}
    )


def _features(split: tuple[list[int], list[int] | None, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    a, b, _ = split
    u = vectors[a].astype(np.float64)
    if b is None:
        return u
    v = vectors[b].astype(np.float64)
    return np.c_[np.abs(u - v), u * v]  # SentEval's MRPC features


def _fit_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, c: float) -> float:
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    # One BLAS thread in every fit, in a worker process or not: a multi-threaded
    # BLAS may sum in another order, so the score would depend on n_jobs and cores.
    with threadpool_limits(limits=1):
        return float(_classifier(c).fit(x[train], y[train]).score(x[test], y[test]))


def score_transfer(data: TransferData, vectors: np.ndarray, seed: int = 1111, n_jobs: int | None = 1) -> float:
    """Test accuracy x100: 10-fold CV (MR, CR, MPQA), dev-tuned (SST-2) or inner-CV-tuned (TREC, MRPC).

    ``data``'s splits hold rows of ``vectors`` (see :func:`_rows`). The fits are
    independent and deterministic, so ``n_jobs`` processes (joblib; -1: every
    core) give the same number as one, sooner.
    """
    from joblib import Parallel, delayed  # scikit-learn's own dependency

    _, kfold, _, _ = _sklearn()
    parallel = Parallel(n_jobs=n_jobs)

    def best_c(x: np.ndarray, y: np.ndarray, folds: list[np.ndarray]) -> list[float]:
        """SentEval's inner 5-fold choice of the regularization strength, for each training set in ``folds``."""
        jobs = []  # (training set, C, inner train rows, inner test rows)
        for k, tr in enumerate(folds):
            for i, j in kfold(n_splits=5, shuffle=True, random_state=seed).split(tr, y[tr]):
                jobs += [(k, c, tr[i], tr[j]) for c in C_GRID]
        accs = parallel(delayed(_fit_score)(x, y, i, j, c) for _, c, i, j in jobs)
        by_c: dict[tuple[int, float], list[float]] = {}
        for (k, c, _, _), acc in zip(jobs, accs, strict=True):
            by_c.setdefault((k, c), []).append(acc)
        mean = {key: float(np.mean(v)) for key, v in by_c.items()}
        return [max(C_GRID, key=lambda c, k=k: mean[(k, c)]) for k in range(len(folds))]

    if "all" in data.splits:
        x, y = _features(data.splits["all"], vectors), data.splits["all"][2]
        outer = list(kfold(n_splits=10, shuffle=True, random_state=seed).split(x, y))
        cs = best_c(x, y, [tr for tr, _ in outer])
        accs = parallel(delayed(_fit_score)(x, y, tr, te, c) for (tr, te), c in zip(outer, cs, strict=True))
        return 100.0 * float(np.mean(accs))
    names = [k for k in ("train", "dev", "test") if k in data.splits]
    x = np.concatenate([_features(data.splits[k], vectors) for k in names])
    y = np.concatenate([data.splits[k][2] for k in names])
    at, start = {}, 0
    for k in names:
        at[k] = np.arange(start, start + len(data.splits[k][2]))
        start += len(at[k])
    if "dev" in data.splits:
        accs = parallel(delayed(_fit_score)(x, y, at["train"], at["dev"], c) for c in C_GRID)
        c = C_GRID[int(np.argmax(accs))]  # the first best, as max() over the grid
    else:
        (c,) = best_c(x, y, [at["train"]])
    return 100.0 * _fit_score(x, y, at["train"], at["test"], c)


def run_transfer(
    data: TransferData,
    encode: Callable[[list[str]], np.ndarray],
    save_dir: Path | None = None,
    save_dtype: type[np.floating] = np.float32,
    n_jobs: int | None = 1,
) -> dict[str, float | int]:
    """Score one transfer task; with ``save_dir``, write what recomputes it (:func:`rescore_saved`).

    ``save_dir/TASK.npy`` holds one row per distinct sentence (rounded to
    ``save_dtype`` before scoring, as in :func:`run_sts`) and ``TASK.items.tsv``
    one line per item: split, row of a, row of b (-1 when single), label.
    """
    sentences = data.sentences()
    t0 = time.perf_counter()
    vectors = np.asarray(encode(sentences), dtype=np.float32)
    seconds = time.perf_counter() - t0
    if save_dir is not None and save_dtype != np.float32:
        vectors = vectors.astype(save_dtype).astype(np.float32)
    rows = _rows(data)
    if save_dir is not None:
        _save_vectors(save_dir, data.name, vectors.astype(save_dtype))
        lines = [
            f"{split}\t{a}\t{-1 if b is None else b[i]}\t{label}\n"
            for split, (rows_a, b, y) in rows.splits.items()
            for i, (a, label) in enumerate(zip(rows_a, y.tolist(), strict=True))
        ]
        with atomic_write(save_dir / f"{data.name}.items.tsv") as f:
            f.write("".join(lines).encode("utf-8"))
    score = score_transfer(rows, vectors, n_jobs=n_jobs)
    return {"score": score, "sentences": len(sentences), "seconds": seconds}


# -- a whole evaluation, as `metaeol eval` runs it ---------------------------------------


def evaluate(
    encode: Callable[[list[str]], np.ndarray],
    tasks: Sequence[str],
    root: Path,
    *,
    limit: int | None = None,
    save_dir: Path | None = None,
    n_jobs: int | None = -1,
    about: dict[str, object] | None = None,
    on_task: Callable[[str, dict[str, float | int]], None] | None = None,
) -> dict[str, object]:
    """Score ``encode`` on SentEval tasks and return the report (a dict, what ``--json`` prints).

    Every task's files are read before any work, so a missing one fails fast.
    ``about`` (model, level, backend, ...) heads the report; ``on_task(name,
    result)`` is called as each task is scored. The transfer tasks' classifier
    fits are independent: ``n_jobs`` processes (-1: one per core) give the same scores.
    """
    if limit is not None and limit < 2:
        raise InputError("limit must be at least 2")
    if n_jobs is not None and (n_jobs == 0 or n_jobs < -1):
        raise InputError("jobs takes a number of processes, or -1 for one per core")
    data = [load_sts(t, root, "test", limit) if t in STS_TASKS else load_transfer(t, root, limit) for t in tasks]
    results: dict[str, dict[str, float | int]] = {}
    for d in data:
        if isinstance(d, STSData):
            results[d.name] = run_sts(d, encode, save_dir)
        else:
            results[d.name] = run_transfer(d, encode, save_dir, n_jobs=n_jobs)
        if on_task is not None:
            on_task(d.name, results[d.name])
    sts = [r["score"] for t, r in results.items() if t in STS_TASKS]
    transfer = [r["score"] for t, r in results.items() if t in TRANSFER_TASKS]
    return {
        **(about or {}),
        "limit": limit,
        "scores": {k: v["score"] for k, v in results.items()},
        "sts_average": float(np.mean(sts)) if sts else None,
        "transfer_average": float(np.mean(transfer)) if transfer else None,
        "details": results,
    }
