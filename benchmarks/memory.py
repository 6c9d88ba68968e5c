"""Peak memory of `metaeol embed` does not grow with the input: it streams.

    python benchmarks/memory.py [--sizes 1000,8000] [--model smollm2-135m] [--templates prompteol]
    python benchmarks/memory.py --table --sizes 2000,20000 --workers 2 --out benchmarks/results/memory_parquet.json

Each size runs ``metaeol embed --templates prompteol --no-cache`` on that many
sentences in its own process, one after another, and reports that process's
peak RSS (VmHWM) side by side, with the ratio of each to the first. The
sentences are a seeded random sample (with replacement past the pool's size)
of the distinct sentences of STS-B train, dev and test, from the SentEval data
(``$METAEOL_DATA`` or ``../shared/senteval``).
With ``--table`` the input is a Parquet table (an ``id`` and a ``text``
column) and the output Parquet with the ids (``--id-column id``), through
``--workers`` processes: the job's own process (reader, shards, writer) and each
worker report their peak RSS.
Results go to ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"

# Runs the CLI in this process and prints its peak RSS: the child measures itself.
CHILD = """
import sys
sys.path.insert(0, {bench!r})
from _proc import peak_rss_mb
from metaeol_edge.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_MB", peak_rss_mb(), flush=True)
sys.exit(rc)
"""


def sample(n: int, seed: int = 0) -> list[str]:
    from metaeol_edge.evaluation import data_dir, load_sts

    root = data_dir()
    pool = list(
        dict.fromkeys(s for split in ("train", "dev", "test") for s in load_sts("stsb", root, split).sentences())
    )
    rng = random.Random(seed)
    return rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]


# A Parquet job: the job's process and its workers report their peaks.
TABLE_CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
from _proc import peak_rss_mb
from metaeol_edge.bulk import embed_file
r = embed_file({src!r}, {out!r}, {options!r}, id_column="id", workers={workers}, show_progress=False)
print("PEAK_RSS_MB", peak_rss_mb(), json.dumps(sorted(r.workers.values())), flush=True)
"""


def run_table(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp / f"in{n}.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": sample(n, args.seed)}), src)
    out = tmp / f"out{n}.parquet"
    options = dict(model=args.model, templates=args.templates, cache=False)
    code = TABLE_CHILD.format(bench=str(HERE.parent), src=str(src), out=str(out), options=options, workers=args.workers)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"the Parquet job of {n} rows failed:\n{r.stderr}")
    line = next(line for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_MB"))
    _, main_peak, workers = line.split(" ", 2)
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert ids == list(range(n)), "rows out of order"
    worker_peaks = json.loads(workers)
    return {
        "sentences": n,
        "peak_rss_mb": max([float(main_peak), *worker_peaks]),
        "job_process_rss_mb": float(main_peak),
        "workers_rss_mb": worker_peaks,
        "seconds": seconds,
        "sentences_per_s": n / seconds,
    }


def run(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    if args.table:
        return run_table(n, args, tmp)
    src = tmp / f"in{n}.txt"
    src.write_text("\n".join(sample(n, args.seed)) + "\n", encoding="utf-8")
    out = tmp / f"out{n}.npy"
    cmd = [sys.executable, "-c", CHILD.format(bench=str(HERE.parent))]
    cmd += ["embed", "--model", args.model, "--templates", args.templates, "--no-cache", "-q", "-i", str(src)]
    cmd += ["-o", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"embed of {n} sentences failed:\n{r.stderr}")
    peak = float(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PEAK_RSS_MB")))
    rows = len(np.load(out, mmap_mode="r"))
    assert rows == n, (rows, n)
    return {"sentences": n, "peak_rss_mb": peak, "seconds": seconds, "sentences_per_s": n / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,8000")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="prompteol")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="a Parquet job (ids carried) through --workers processes")
    ap.add_argument("--workers", type=int, default=2, help="with --table: engine processes (2)")
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            rows.append(run(n, args, Path(tmp)))
    first = rows[0]["peak_rss_mb"]
    kind = f"a Parquet job, --workers {args.workers}, ids carried" if args.table else "one process per size"
    print(f"metaeol embed --model {args.model} --templates {args.templates} --no-cache ({kind})")
    print(f"{'sentences':>10}{'peak RSS MB':>13}{'vs first':>10}{'sent/s':>9}")
    for row in rows:
        row["ratio_to_first"] = row["peak_rss_mb"] / first
        print(
            f"{row['sentences']:>10}{row['peak_rss_mb']:>13.1f}{row['ratio_to_first']:>10.3f}{row['sentences_per_s']:>9.1f}"
            + (
                f"   (job process {row['job_process_rss_mb']:.1f} MB, workers {row['workers_rss_mb']})"
                if args.table
                else ""
            )
        )
    report = {"model": args.model, "templates": args.templates, "seed": args.seed, "table": args.table, "rows": rows}
    if args.table:
        report["workers"] = args.workers
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
