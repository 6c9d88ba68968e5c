"""Small calls on the llama.cpp engine: template prefixes copied in from a saved state, against decoded each time.

    python benchmarks/calls.py --model smollm2-135m --calls 16

A one-sentence MetaEOL call is 8 prompts whose template prefixes (~60 tokens each) are most of its tokens. The
engine decodes each prefix once and copies its KV cells in after (:mod:`metaeol_edge.backends.snapshots`). In one
process, on seeded random STS-B test sentences, the same engine runs each call twice, back to back (each way first
in every other call): with the saved prefixes, and with a store that keeps nothing (every prefix load decodes, as
before it). Calls of 1 and 4 sentences, the vectors of the two compared bit for bit. The engine as a laptop
without AMX runs it: llama.cpp, level auto, its default lanes. Rows go to ``benchmarks/results/calls.json``;
``benchmarks/pages.py`` renders them.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

from metaeol_edge import MetaEOL
from metaeol_edge.backends.snapshots import PrefixSnapshots
from metaeol_edge.evaluation import data_dir, load_sts

RESULTS = Path(__file__).parent / "results"


def use_store(model: MetaEOL, store: PrefixSnapshots) -> None:
    for lane in model.engine._lanes:
        lane._snapshots = store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="metaeol")
    ap.add_argument("--calls", type=int, default=16, help="timed calls per size and way")
    ap.add_argument("--sizes", default="1,4", help="sentences per call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="SentEval folder (default: $METAEOL_DATA or ../shared/senteval)")
    ap.add_argument("--out", type=Path, default=RESULTS / "calls.json")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    pool = load_sts("stsb", data_dir(args.data), "test").sentences()
    rng = random.Random(args.seed)
    rows = []
    with MetaEOL(args.model, templates=args.templates, backend="llama.cpp", cache=False) as model:
        saved, nothing = model.engine._snapshots, PrefixSnapshots(limit=0)
        model.encode(rng.sample(pool, 2), show_progress_bar=False)  # load, and save the prefixes
        for size in sizes:
            seconds = {"saved": 0.0, "decoded": 0.0}
            ways = [("saved", saved), ("decoded", nothing)]
            for call in range(args.calls):
                sentences = rng.sample(pool, size)
                got = {}
                for way, store in ways if call % 2 == 0 else ways[::-1]:  # each way first in half the calls
                    use_store(model, store)
                    t0 = time.perf_counter()
                    got[way] = model.encode(sentences, show_progress_bar=False)
                    seconds[way] += time.perf_counter() - t0
                assert got["saved"].tobytes() == got["decoded"].tobytes()
            for way in ("saved", "decoded"):
                rows.append(
                    dict(
                        model=args.model,
                        templates=args.templates,
                        level=model.level,
                        lanes=model.engine.lanes,
                        sentences_per_call=size,
                        prefixes=way,
                        calls=args.calls,
                        ms_per_call=round(1000 * seconds[way] / args.calls, 1),
                        sentences_per_s=round(size * args.calls / seconds[way], 2),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
            rows[-2]["speedup"] = round(seconds["decoded"] / seconds["saved"], 2)
        use_store(model, saved)
    command = "python benchmarks/calls.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
