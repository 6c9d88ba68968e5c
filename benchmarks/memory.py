"""Peak memory of `metaeol embed` does not grow with the input: it streams.

    python benchmarks/memory.py [--sizes 1000,8000] [--model smollm2-135m] [--templates prompteol]

Each size runs ``metaeol embed --templates prompteol --no-cache`` on that many
sentences in its own process, one after another, and reports that process's
peak RSS (VmHWM) side by side, with the ratio of each to the first. The
sentences are a seeded random sample (with replacement past the pool's size)
of the distinct sentences of STS-B train, dev and test, from the SentEval data
(``$METAEOL_DATA`` or ``../shared/senteval``).
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


def run(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
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
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            rows.append(run(n, args, Path(tmp)))
    first = rows[0]["peak_rss_mb"]
    print(f"metaeol embed --model {args.model} --templates {args.templates} --no-cache (one process per size)")
    print(f"{'sentences':>10}{'peak RSS MB':>13}{'vs first':>10}{'sent/s':>9}")
    for row in rows:
        row["ratio_to_first"] = row["peak_rss_mb"] / first
        print(
            f"{row['sentences']:>10}{row['peak_rss_mb']:>13.1f}{row['ratio_to_first']:>10.3f}{row['sentences_per_s']:>9.1f}"
        )
    report = {"model": args.model, "templates": args.templates, "seed": args.seed, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
