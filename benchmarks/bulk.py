"""Bulk embedding on every core: one process with all threads, N one-thread processes, Ray actors.

    python benchmarks/bulk.py [--n 1000] [--model smollm2-135m] [--templates metaeol]
                              [--other gemma3-270m --other-n 200] [--modes ...]

The same seeded random sample of the distinct STS-B sentences (train, dev and
test; ``$METAEOL_DATA`` or ``../shared/senteval``) goes through each mode, one
after another, each in a fresh process, cache off:

* ``1x2``: ``metaeol embed --workers 1`` with all threads (the 0.1 way);
* ``1x1``: one process with one thread (the base of the scaling line);
* ``2x1``: ``--workers 2``, one thread each;
* ``ray-job``: ``--ray local --workers 2``: the resumable job, two one-CPU Ray actors;
* ``ray-data``: ``bulk.embed_dataset`` on a Ray Dataset, two one-CPU actors.

Sentences/s is the rows over the wall time of the whole process (start-up, model
loading, Ray's start included: what a user waits for). Every mode's vectors must
equal the first mode's byte for byte, or the script fails. Peak RSS is each
process's VmHWM (Ray Data actors are not asked). ``--other`` repeats ``1x2`` and
``2x1`` on another model (what ``--workers auto`` is chosen from).
Results: ``benchmarks/results/bulk.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE.parent))

from memory import sample  # noqa: E402 - the same seeded STS-B sample as the memory benchmark

# A job in a fresh process; prints its report as JSON on the last line.
JOB = """
import json, sys
sys.path.insert(0, {bench!r})
from _proc import peak_rss_mb
from metaeol_edge.bulk import embed_file
r = embed_file({src!r}, {out!r}, {options!r}, workers={workers!r}, threads={threads!r}, ray={ray!r},
               show_progress=False)
print(json.dumps({{"job_seconds": r.seconds, "main_rss_mb": peak_rss_mb(), "workers_rss_mb": r.workers}}))
"""

# Ray Data: embed_dataset over the same sentences, vectors put back in input order by id.
DATASET = """
import json, sys
import numpy as np
import ray
sys.path.insert(0, {bench!r})
from _proc import peak_rss_mb
from metaeol_edge.bulk import embed_dataset
texts = open({src!r}, encoding="utf-8").read().splitlines()
ray.init(num_cpus={cpus}, include_dashboard=False, logging_level="error")
ds = ray.data.from_items([{{"id": i, "text": t}} for i, t in enumerate(texts)])
out = embed_dataset(ds, {model!r}, {templates!r}, concurrency={actors}, num_cpus=1, batch_size=32, cache=False)
rows = sorted(out.iter_rows(), key=lambda r: r["id"])
vectors = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
np.save({out!r}, vectors)
print(json.dumps({{"main_rss_mb": peak_rss_mb(), "workers_rss_mb": {{}}}}))
"""

MODES = {
    "1x2": dict(workers=1, threads=2, ray=None),
    "1x1": dict(workers=1, threads=1, ray=None),
    "2x1": dict(workers=2, threads=2, ray=None),
    "ray-job": dict(workers=2, threads=2, ray="local"),
    "ray-data": dict(workers=2, threads=2, ray="dataset"),
}


def run_mode(mode: str, model: str, templates: str, src: Path, out: Path) -> dict:
    spec = MODES[mode]
    options = dict(model=model, templates=templates, cache=False)
    if spec["ray"] == "dataset":
        code = DATASET.format(
            bench=str(HERE.parent), src=str(src), out=str(out), model=model, templates=templates, cpus=2, actors=2
        )
    else:
        code = JOB.format(bench=str(HERE.parent), src=str(src), out=str(out), options=options, **spec)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{mode} failed:\n{r.stderr[-4000:]}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    n = len(np.load(out, mmap_mode="r"))
    return {
        "mode": mode,
        "model": model,
        "templates": templates,
        "sentences": n,
        "processes": spec["workers"],
        "threads_each": max(1, spec["threads"] // spec["workers"]),
        "ray": spec["ray"],
        "seconds": seconds,
        "sentences_per_s": n / seconds,
        "main_rss_mb": report["main_rss_mb"],
        "workers_rss_mb": sorted(report["workers_rss_mb"].values()),
    }


def measure(model: str, templates: str, n: int, modes: list[str], seed: int, tmp: Path) -> list[dict]:
    src = tmp / f"{model}-{n}.txt"
    src.write_text("\n".join(sample(n, seed)) + "\n", encoding="utf-8")
    rows, first = [], None
    for mode in modes:
        out = tmp / f"{model}-{mode}.npy"
        row = run_mode(mode, model, templates, src, out)
        vectors = np.load(out)
        first = vectors if first is None else first
        row["identical_to_first"] = vectors.dtype == first.dtype and vectors.tobytes() == first.tobytes()
        if not row["identical_to_first"]:
            sys.exit(f"{mode} gave other vectors than {modes[0]} on {model}")
        rows.append(row)
        workers = ", ".join(f"{x:.0f}" for x in row["workers_rss_mb"]) or "-"
        print(
            f"{model:<14}{mode:<10}{row['sentences_per_s']:>8.2f}{row['seconds']:>9.1f}"
            f"{row['main_rss_mb']:>9.0f}   {workers}",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="metaeol")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--other", default="gemma3-270m", help="another model for 1x2 vs 2x1 ('' to skip)")
    ap.add_argument("--other-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "bulk.json"))
    args = ap.parse_args()
    modes = args.modes.split(",")
    print(f"cores usable: {len(os.sched_getaffinity(0))}; cache off; sentences/s over each process's wall time")
    print(f"{'model':<14}{'mode':<10}{'sent/s':>8}{'seconds':>9}{'main MB':>9}   workers' peak RSS MB")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.model, args.templates, args.n, modes, args.seed, Path(tmp))
        if args.other:
            rows += measure(args.other, args.templates, args.other_n, ["1x2", "2x1"], args.seed, Path(tmp))
    by = {(r["model"], r["mode"]): r["sentences_per_s"] for r in rows}
    base = by[(args.model, "1x2")]
    summary = {}
    print()
    for mode in modes[1:]:
        summary[f"{mode}_vs_1x2"] = by[(args.model, mode)] / base
        print(f"{mode} / 1x2 ({args.model}): {summary[f'{mode}_vs_1x2']:.3f}")
    if (args.model, "1x1") in by and (args.model, "2x1") in by:
        summary["scaling_1_to_2_workers"] = by[(args.model, "2x1")] / by[(args.model, "1x1")]
        print(f"2 workers / 1 worker, one thread each: {summary['scaling_1_to_2_workers']:.3f}")
    for mode in ("ray-job", "ray-data"):
        if (args.model, mode) in by and (args.model, "2x1") in by:
            summary[f"{mode}_vs_2x1"] = by[(args.model, mode)] / by[(args.model, "2x1")]
            print(f"{mode} / 2x1: {summary[f'{mode}_vs_2x1']:.3f}")
    if args.other:
        summary["other_2x1_vs_1x2"] = by[(args.other, "2x1")] / by[(args.other, "1x2")]
        print(f"2x1 / 1x2 ({args.other}): {summary['other_2x1_vs_1x2']:.3f}")
    report = {"n": args.n, "seed": args.seed, "templates": args.templates, "rows": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
