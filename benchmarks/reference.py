"""The full-precision reference's own scores, on the PyTorch backend (a GPU when there is one).

    python benchmarks/reference.py --model PATH.gguf|HF-ID|DIR --tasks sts \\
        --dtypes float32,bfloat16,float16 --ablations --save-embeddings DIR [--compare engine.npz]

For each dtype x method (MetaEOL, PromptEOL, and with ``--ablations`` each
meta-task's two MetaEOL templates alone, from the same per-template vectors),
one row with every task's score (STS: Spearman x100; transfer tasks, ``--tasks
transfer``: test accuracy x100), the averages, sentences/s on the device, and,
for dtypes after the first, the mean and minimum cosine of the sentence vectors
to the first dtype's. The transfer tasks' classifiers train on the CPU
(``--jobs`` processes) while the device encodes the next task. ``--compare``
takes per-template vectors that the llama.cpp engine wrote (``--write-compare``
makes that file, on a machine with llama.cpp) and prints how close the reference
comes to them. ``--merge A.json B.json ...`` joins the reports of a run done in
pieces (a short GPU lease) into one.

Rows are written to ``OUT/NAME.json`` and ``OUT/NAME.md`` after every task, so
a run cut short keeps what it finished; ``--budget-s`` stops starting new work
after that many seconds. With ``--save-embeddings`` the vectors of the first
dtype's MetaEOL and PromptEOL rows (``--save-methods``) are saved rounded to
float16 (so the files are half the size) with the pair order; the scores are
computed from those same rounded vectors, so
``metaeol_edge.evaluation.rescore_saved`` gives back the numbers in the table
(transfer tasks too, from ``TASK.npy`` and ``TASK.items.tsv``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _markdown import cell, table  # benchmarks/ is on sys.path when a script here runs

RESULTS = Path(__file__).resolve().parent / "results"
EMPTY = {"average": None, "transfer_average": None, "cos_mean": None, "cos_min": None, "sentences_per_s": None}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def write_compare(model: str, sentences: list[str], path: Path) -> None:
    """Per-template MetaEOL vectors of the llama.cpp engine, for ``--compare`` on another machine."""
    from metaeol_edge import MetaEOL

    with MetaEOL(model, "metaeol") as m:
        vecs = m.encode(sentences, per_template=True, show_progress_bar=False)
    np.savez(path, sentences=np.array(sentences), vectors=vecs)


def markdown(report: dict) -> str:
    from metaeol_edge.evaluation import STS_TASKS

    tasks = report["tasks"]
    averages = [
        (k, h)
        for k, h, there in (
            ("average", "avg", set(tasks) & set(STS_TASKS)),
            ("transfer_average", "transfer avg", set(tasks) - set(STS_TASKS)),
        )
        if there
    ]
    head = ["dtype", "method", *tasks, *(h for _, h in averages), "cos mean", "cos min", "sent/s"]
    if report.get("parts"):
        measured = "cos and sent/s: in each run's own report (each measured its own tasks only)."
    else:
        measured = (
            f"cos: of each sentence vector to the {report['dtypes'][0]} row's. sent/s: this task set on that "
            f"device, batch {report['batch_size']}"
            + (", while the transfer classifiers trained on the CPU." if averages[-1][0] == "transfer_average" else ".")
        )
    scope = f"the first {report['limit']} pairs" if report.get("limit") else "all test pairs"
    lines = [
        f"Full-precision reference (PyTorch {report['torch']}, transformers {report['transformers']}) on "
        f"{report['device']}, model `{report['model']}`. STS: Spearman x100 over {scope}; transfer tasks: "
        f"test accuracy x100{' (first items of each split)' if report.get('limit') else ''}. {measured}",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    if report.get("parts"):
        lines += ["Made of these runs:", "", *(f"- `{c}`" for c in report["parts"]), ""]
    rows = []
    for r in report["rows"]:
        cells = [r["dtype"], r["method"], *[cell(r["scores"].get(t)) for t in tasks]]
        cells += [cell(r.get(k)) for k, _ in averages]
        cells += [cell(r["cos_mean"], ".5f"), cell(r["cos_min"], ".5f")]
        rows.append(cells + [cell(r["sentences_per_s"], ".1f")])
    lines += table(head, rows, text_columns=2)
    if report.get("compare"):
        c = report["compare"]
        lines += [
            "",
            f"Against the llama.cpp engine ({c['file']}, {c['sentences']} sentences x {c['templates']} templates, "
            f"per-template vectors, {report['dtypes'][0]}): cosine mean {c['cos_mean']:.6f}, min {c['cos_min']:.6f}.",
        ]
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], command: str) -> dict:
    """One report from the JSON reports of a run done in pieces: rows joined by dtype and method.

    Scores and averages are recomputed over the joined tasks; sentences/s and
    cosines, which each piece measured over its own tasks only, are left out.
    """
    from metaeol_edge.evaluation import STS_TASKS, TRANSFER_TASKS

    parts = [json.loads(p.read_text("utf-8")) for p in paths]
    keys = ("model", "torch", "transformers", "device", "batch_size", "limit")
    for key in keys:  # pieces of one run, not a mixture of runs
        seen = {json.dumps(part.get(key)) for part in parts}
        if len(seen) > 1:
            raise SystemExit(f"--merge: the reports differ in {key} ({', '.join(sorted(seen))}); not one run's pieces")
    tasks = [t for t in (*STS_TASKS, *TRANSFER_TASKS) if any(t in part["tasks"] for part in parts)]
    rows: dict[tuple[str, str], dict] = {}
    for path, part in zip(paths, parts, strict=True):
        for r in part["rows"]:
            row = rows.setdefault((r["dtype"], r["method"]), {"dtype": r["dtype"], "method": r["method"], "scores": {}})
            for task, score in r["scores"].items():
                if task in row["scores"] and row["scores"][task] != score:
                    raise SystemExit(
                        f"--merge: {r['dtype']} {r['method']} {task} is {row['scores'][task]} in one report and "
                        f"{score} in {path}"
                    )
                row["scores"][task] = score
    for row in rows.values():
        row |= EMPTY
        sts_names = [t for t in tasks if t in STS_TASKS]  # lists, not sets: the same sum every run
        transfer_names = [t for t in tasks if t not in STS_TASKS]
        for key, names in (("average", sts_names), ("transfer_average", transfer_names)):
            if names and set(names) <= set(row["scores"]):
                row[key] = float(np.mean([row["scores"][t] for t in names]))
    return {
        **{k: parts[0].get(k) for k in keys},
        "command": command,
        "parts": [part["command"] for part in parts],
        "tasks": tasks,
        "dtypes": list(dict.fromkeys(d for part in parts for d in part["dtypes"])),
        "rows": list(rows.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file, a Hugging Face id or a local checkpoint folder")
    ap.add_argument("--tasks", default="stsb,sickr", help="task names, or the groups sts, transfer, all")
    ap.add_argument("--methods", default="metaeol,prompteol")
    ap.add_argument("--dtypes", default="float32", help="comma-separated; the first is the one others are compared to")
    ap.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first present)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ablations", action="store_true", help="add each meta-task's templates alone")
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of each task (quick runs)")
    ap.add_argument("--save-embeddings", default=None, help="folder for the first dtype's vectors and pair orders")
    ap.add_argument("--save-methods", default="metaeol,prompteol", help="rows whose vectors are saved")
    ap.add_argument("--compare", default=None, help="an .npz written by --write-compare")
    ap.add_argument("--write-compare", default=None, help="write the llama.cpp engine's vectors here and stop")
    ap.add_argument("--compare-n", type=int, default=64, help="STS-B test sentences for --write-compare")
    ap.add_argument("--jobs", type=int, default=-1, help="processes for the transfer classifiers (-1: every core)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new work after this many seconds")
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--name", default="reference")
    ap.add_argument("--merge", nargs="+", metavar="REPORT.json", help="join reports of runs done in pieces into NAME")
    args = ap.parse_args()
    command = "python benchmarks/reference.py " + " ".join(sys.argv[1:])
    if args.merge:
        from metaeol_edge.files import atomic_write

        report = merge([Path(p) for p in args.merge], command)
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            with atomic_write(Path(args.output) / f"{args.name}{suffix}") as f:
                f.write(text.encode("utf-8"))
        print(markdown(report))
        return
    if not args.model:
        ap.error("--model is required (except with --merge)")

    from metaeol_edge.evaluation import STS_TASKS, data_dir, load_sts, load_transfer, run_sts, run_transfer, task_names

    root = data_dir(args.data)
    if args.write_compare:
        write_compare(
            args.model, load_sts("stsb", root, "test").sentences()[: args.compare_n], Path(args.write_compare)
        )
        return

    import torch
    import transformers
    from metaeol_edge.prompts import load_templates
    from metaeol_edge.reference import Reference

    from metaeol_edge.files import atomic_write

    t_start = time.perf_counter()
    tasks = {
        name: load_sts(name, root, "test", args.limit) if name in STS_TASKS else load_transfer(name, root, args.limit)
        for name in task_names(args.tasks)
    }
    dtypes = args.dtypes.split(",")
    save = set(args.save_methods.split(",")) if args.save_embeddings else set()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": command,
        "model": Path(args.model).name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tasks": list(tasks),
        "dtypes": dtypes,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "device": None,  # known once a model is loaded
        "rows": [],
    }
    first: dict[tuple[str, str], np.ndarray] = {}  # (method label, task) -> the first dtype's vectors

    def flush() -> None:  # whole files or none: a run killed mid-write keeps the last complete report
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            with atomic_write(out / f"{args.name}{suffix}") as f:
                f.write(text.encode("utf-8"))

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - t_start > args.budget_s

    def stop() -> bool:  # no new work: out of budget, or a classifier failed (device time is precious)
        return failed.is_set() or over_budget()

    def run_method(ref: Reference, dtype: str, method: str) -> None:
        variants: dict[str, list[int] | None] = {method: None}
        if method == "metaeol" and args.ablations:
            groups = load_templates("metaeol").meta_tasks()
            variants |= {f"metaeol: {name} only": idx for name, idx in groups.items()}
        rows = {label: {"dtype": dtype, "method": label, "scores": {}, **EMPTY} for label in variants}
        cosines: dict[str, list[np.ndarray]] = {label: [] for label in variants}
        if args.compare and method == "metaeol" and dtype == dtypes[0]:
            ref_file = np.load(args.compare)
            mine = ref.encode([str(s) for s in ref_file["sentences"]], args.batch_size, per_template=True)
            c = _cos(mine, ref_file["vectors"]).ravel()
            with lock:  # the scoring thread may be writing the report
                report["compare"] = {
                    "file": Path(args.compare).name,
                    "sentences": int(mine.shape[0]),
                    "templates": int(mine.shape[1]),
                    "cos_mean": float(c.mean()),
                    "cos_min": float(c.min()),
                }
            print(f"   vs llama.cpp: cos mean {c.mean():.6f} min {c.min():.6f}", file=sys.stderr)
        n_sent, seconds = 0, 0.0
        for name, data in tasks.items():
            if stop():
                return
            sentences = data.sentences()
            if ref.on_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            per_template = ref.encode(sentences, args.batch_size, per_template=True)
            seconds += time.perf_counter() - t0
            n_sent += len(sentences)
            with lock:
                if not any(r is rows[method] for r in report["rows"]):  # rows appear once a task is encoded
                    report["rows"] += rows.values()
                for r in rows.values():
                    r["sentences_per_s"] = n_sent / seconds
            for label, idx in variants.items():
                vecs = (per_template if idx is None else per_template[:, idx]).mean(axis=1)
                saved = label in save and dtype == dtypes[0]
                where = Path(args.save_embeddings) / method if saved else None
                save_dtype = np.float16 if saved else np.float32
                if saved:  # scored from, and compared with, what the files hold
                    vecs = vecs.astype(np.float16).astype(np.float32)
                if dtype == dtypes[0]:
                    first[(label, name)] = vecs
                else:
                    with lock:
                        allc = np.concatenate([*cosines[label], _cos(vecs, first[(label, name)])])
                        cosines[label] = [allc]
                        rows[label]["cos_mean"], rows[label]["cos_min"] = float(allc.mean()), float(allc.min())
                if name in STS_TASKS:
                    record(rows[label], name, run_sts(data, lambda s, v=vecs: v, where, save_dtype)["score"])
                else:  # the classifiers train on the CPU while the device goes on
                    job = scorer.submit(score_later, rows[label], data, vecs, where, save_dtype)
                    job.add_done_callback(report_failure)
                    pending.append(job)
            print(f"== {dtype} {method} {name}: encoded", file=sys.stderr, flush=True)

    def score_later(row: dict, data, vecs: np.ndarray, where: Path | None, save_dtype) -> None:
        if stop():  # the budget holds for the queued classifiers too
            print(f"== {row['dtype']} {row['method']} {data.name}: not scored (stopped)", file=sys.stderr)
            return
        record(row, data.name, run_transfer(data, lambda _: vecs, where, save_dtype, n_jobs=args.jobs)["score"])

    def report_failure(job) -> None:  # at once, and stop: not after every other task has been encoded
        if not job.cancelled() and job.exception() is not None:
            failed.set()
            print(f"== a transfer task's scoring failed: {job.exception()!r}", file=sys.stderr, flush=True)

    def record(row: dict, task: str, score: float) -> None:
        with lock:
            row["scores"][task] = score
            for key, names in (("average", sts_names), ("transfer_average", transfer_names)):
                # An average over only some of the tasks would not compare with the other rows.
                done = names and all(t in row["scores"] for t in names)
                row[key] = float(np.mean([row["scores"][t] for t in names])) if done else None
            print(f"== {row['dtype']} {row['method']} {task}: {score:.2f}", file=sys.stderr, flush=True)
            flush()

    sts_names = [t for t in tasks if t in STS_TASKS]
    transfer_names = [t for t in tasks if t not in STS_TASKS]
    lock = threading.RLock()
    failed = threading.Event()
    pending: list = []
    scorer = ThreadPoolExecutor(max_workers=1)
    try:
        for dtype in dtypes:
            for method in args.methods.split(","):
                if stop():
                    break
                with Reference(args.model, method, dtype=dtype, device=args.device) as ref:
                    with lock:
                        report["device"] = torch.cuda.get_device_name(ref.device) if ref.on_cuda else ref.device
                    run_method(ref, dtype, method)
        for job in pending:
            job.result()  # raise what a classifier raised
    finally:
        # After an error or Ctrl-C, queued classifiers are dropped rather than awaited;
        # every score is already written by record(), and the totals are added here.
        scorer.shutdown(cancel_futures=True)
        with lock:
            report["seconds"] = time.perf_counter() - t_start
            if any(r["scores"] for r in report["rows"]):  # never replace a report with an empty one
                flush()
    print(markdown(report))


if __name__ == "__main__":
    main()
