"""The server under load, next to ``MetaEOL.encode`` on the same sentences, in one run.

    python benchmarks/serve.py [--clients 16] [--requests 20] [--templates prompteol] [--seed 0]

1. ``MetaEOL.encode`` (cache off) on every sentence the clients will send, in
   the order they send them, in its own process: sentences/s, after the load.
2. ``metaeol serve --no-cache`` on 127.0.0.1 (a free port), then ``--clients``
   threads each sending ``--requests`` requests of 1 to 8 sentences (a seeded
   sample of STS-B's train, dev and test sentences) to ``/v1/embeddings``, each
   request bounded by a timeout and the whole load by ``--deadline`` seconds.
   Reports errors, latency percentiles, the server's sentences/s (sentences
   answered / wall time of the load), its ratio to encode's, and the server's
   peak RSS (VmHWM), then stops it with SIGTERM.
The clients run on the same machine as the server and take CPU from it.
Results go to ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"

ENCODE = """
import json, sys, time
from metaeol_edge import MetaEOL
sentences = json.load(open(sys.argv[1], encoding="utf-8"))
with MetaEOL(sys.argv[2], templates=sys.argv[3], cache=False) as m:
    m.encode(sentences[:4], show_progress_bar=False)  # load outside the timing
    t0 = time.perf_counter()
    m.encode(sentences, show_progress_bar=False)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def plan(args: argparse.Namespace) -> list[list[list[str]]]:
    """Each client's requests, each a list of 1 to 8 sentences."""
    from metaeol_edge.evaluation import data_dir, load_sts

    root = data_dir()
    pool = list(dict.fromkeys(s for sp in ("train", "dev", "test") for s in load_sts("stsb", root, sp).sentences()))
    rng = random.Random(args.seed)
    return [[rng.sample(pool, rng.randint(1, 8)) for _ in range(args.requests)] for _ in range(args.clients)]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="prompteol")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds the whole load may take")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()
    requests = plan(args)
    flat = [s for client in requests for req in client for s in req]

    src = RESULTS / ".serve_sentences.json"
    src.write_text(json.dumps(flat), encoding="utf-8")
    try:
        run = subprocess.run(
            [sys.executable, "-c", ENCODE, str(src), args.model, args.templates], capture_output=True, text=True
        )
    finally:
        src.unlink(missing_ok=True)
    if run.returncode != 0:
        sys.exit(run.stderr)
    encode_rate = len(flat) / json.loads(run.stdout.strip().splitlines()[-1])["seconds"]

    cmd = [sys.executable, "-m", "metaeol_edge", "serve", "--model", args.model, "-t", args.templates]
    cmd += ["--no-cache", "--port", "0"]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    while url is None:
        line = server.stderr.readline()
        if not line:
            sys.exit("the server stopped before it was ready")
        if line.startswith("serving ") and " on http" in line:
            url = line.strip().rsplit(" on ", 1)[1]
    threading.Thread(target=server.stderr.read, daemon=True).start()  # drain its access log

    latencies: list[float] = []
    errors: list[str] = []
    answered = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + args.deadline

    def client(mine: list[list[str]]) -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            for batch in mine:
                if time.monotonic() > deadline:
                    with lock:
                        errors.append("deadline")
                    return
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/embeddings", json={"model": args.model, "input": batch})
                    ok = r.status_code == 200 and len(r.json()["data"]) == len(batch)
                    why = f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, why = False, f"{type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if ok:
                        answered[0] += len(batch)
                    else:
                        errors.append(why)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in requests]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rss = peak_rss_mb(server.pid)
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=300)

    served_rate = answered[0] / wall
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    report = {
        "model": args.model,
        "templates": args.templates,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "sentences": len(flat),
        "errors": len(errors),
        "error_examples": errors[:5],
        "latency_s": {"p50": p50, "p95": p95, "p99": p99},
        "server_sentences_per_s": served_rate,
        "encode_sentences_per_s": encode_rate,
        "ratio": served_rate / encode_rate,
        "server_peak_rss_mb": rss,
        "server_exit_code": code,
    }
    print(f"{args.clients} clients x {args.requests} requests of 1-8 STS-B sentences ({len(flat)} sentences), "
          f"{args.model}, {args.templates}, cache off")  # fmt: skip
    print(f"errors: {len(errors)}  latency p50 {p50:.2f} s, p95 {p95:.2f} s, p99 {p99:.2f} s")
    print(f"server: {served_rate:.2f} sentences/s; MetaEOL.encode on the same sentences: {encode_rate:.2f}; "
          f"ratio {served_rate / encode_rate:.3f}")  # fmt: skip
    print(f"server peak RSS {rss:.0f} MB; exit code after SIGTERM: {code}")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
