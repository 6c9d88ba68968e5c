"""What the integrity checks cost, measured side by side in one run.

    python benchmarks/checks.py [--n 2000] [--repeats 5]

1. Start: ``MetaEOL("smollm2-135m")`` up to its first vector, with the pulled
   file's SHA-256 check skipped (as 0.1 did), with it as it runs normally (size
   and modification time as recorded: no hashing), and right after the file's
   modification time changed (hashed once more). Each the best of ``--repeats``.
2. Warm run: ``encode`` of ``--n`` sentences that are all in the cache (MetaEOL,
   8 vectors each), with each vector's checksum verified and without, alternating,
   the best of ``--repeats`` each. The sentences are a seeded sample of STS-B's
   train, dev and test sentences; the cache holds random vectors under their
   real keys (reading and checking cost the same as for real ones).
Results go to ``benchmarks/results/checks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "checks.json"))
    args = ap.parse_args()

    from metaeol_edge import MetaEOL, registry
    from metaeol_edge.evaluation import data_dir, load_sts

    source = registry.resolve_model("smollm2-135m")
    report: dict[str, object] = {"model": "smollm2-135m", "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["METAEOL_HOME"] = str(Path(tmp) / "home")
        path = registry.model_path("smollm2-135m")
        path.parent.mkdir(parents=True)
        shutil.copyfile(source, path)
        registry.verify_model("smollm2-135m")

        def start() -> None:
            with MetaEOL("smollm2-135m", templates="prompteol", cache=False) as m:
                m.encode(["A cat sleeps."])

        def start_after_touch() -> None:
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
            start()

        real = registry.check_pulled
        registry.check_pulled = lambda model_id: None
        unchecked = best(start, args.repeats)
        registry.check_pulled = real
        normal = best(start, args.repeats)
        rehash = best(start_after_touch, args.repeats)
        report["start_s"] = {"no_check": unchecked, "normal": normal, "after_mtime_change": rehash}
        print(f"start to first vector (best of {args.repeats}), smollm2-135m ({path.stat().st_size / 1e6:.0f} MB):")
        print(f"  check skipped (0.1):          {unchecked:7.3f} s")
        print(f"  normal (size, mtime as seen):  {normal:7.3f} s  ({normal / unchecked:.3f}x)")
        print(f"  after its mtime changed:       {rehash:7.3f} s  ({rehash / unchecked:.3f}x, hashed again)")

        root = data_dir()
        pool = list(dict.fromkeys(s for sp in ("train", "dev", "test") for s in load_sts("stsb", root, sp).sentences()))
        sentences = random.Random(0).sample(pool, args.n)
        cache = Path(tmp) / "cache.sqlite3"
        with MetaEOL(source, cache=cache) as m:
            # Filled with random vectors under the real keys: reading and checking them costs
            # what real ones cost, and computing 16,000 real ones would take an hour here.
            rng = np.random.default_rng(0)
            m.cache.put_many(
                [
                    (key, "smollm2-135m", unit.label, rng.standard_normal(m.dim).astype(np.float32))
                    for s in sentences
                    for unit, key in zip(m.units, m.cache_keys(s.strip()), strict=True)
                ]
            )
        with MetaEOL(source, cache=cache) as m:
            m.encode(sentences[:10])  # open and warm the connection
            timings: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for verify in (True, False):
                    m.cache.verify = verify
                    t0 = time.perf_counter()
                    m.encode(sentences, show_progress_bar=False)
                    timings[verify].append(time.perf_counter() - t0)
        on, off = min(timings[True]), min(timings[False])
        report["warm_run_s"] = {
            "sentences": args.n,
            "vectors": 8 * args.n,
            "checksums_verified": on,
            "not_verified": off,
        }
        print(f"warm run, {args.n} cached sentences ({8 * args.n} vectors), best of {args.repeats}:")
        print(f"  checksums not verified: {off:7.3f} s")
        print(f"  checksums verified:     {on:7.3f} s  ({on / off:.3f}x)")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
