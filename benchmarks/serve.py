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
3. Issue 30's targets, on a fresh server (skip with ``--no-fairness``):
   ``--big`` (2,048) sentences in one request, and meanwhile a 1-sentence request
   every 0.25 s from 2 s on: their latency (p50, p95, max; target: p95 under 2 s
   on 2 cores with PromptEOL), and the big request's sentences/s against
   ``MetaEOL.encode`` on the same sentences (target: within 10%); then a 1 GB
   body sent chunked (no Content-Length): its status, the bytes sent before the
   server refused it and the server's RSS growth meanwhile; then SIGTERM while a
   big request runs: the seconds to exit and what the request got.
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


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def encode_seconds(sentences: list[str], model: str, templates: str) -> float:
    """``MetaEOL.encode`` on ``sentences`` in its own process, cache off: seconds, after the load."""
    src = RESULTS / ".serve_sentences.json"
    src.write_text(json.dumps(sentences), encoding="utf-8")
    try:
        run = subprocess.run([sys.executable, "-c", ENCODE, str(src), model, templates], capture_output=True, text=True)
    finally:
        src.unlink(missing_ok=True)
    if run.returncode != 0:
        sys.exit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])["seconds"]


def start_server(model: str, templates: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``metaeol serve --no-cache`` on a free port of 127.0.0.1: (process, URL), its log drained."""
    cmd = [sys.executable, "-m", "metaeol_edge", "serve", "--model", model, "-t", templates]
    server = subprocess.Popen([*cmd, "--no-cache", "--port", "0", *extra], stderr=subprocess.PIPE, text=True)
    url = None
    while url is None:
        line = server.stderr.readline()
        if not line:
            sys.exit("the server stopped before it was ready")
        if line.startswith("serving ") and " on http" in line:
            url = line.strip().rsplit(" on ", 1)[1]
    threading.Thread(target=server.stderr.read, daemon=True).start()  # drain its access log
    return server, url


def fairness(args: argparse.Namespace, big: list[str]) -> dict:
    """Issue 30's server targets: small requests behind a big one, a chunked 1 GB body, SIGTERM."""
    import httpx

    encode_rate = len(big) / encode_seconds(big, args.model, args.templates)
    # The big request takes longer than the default --timeout (120 s) on 2 cores: it must finish to be timed.
    server, url = start_server(args.model, args.templates, "--timeout", "1800")
    body = {"model": args.model, "input": big}
    out: dict = {"big_sentences": len(big)}
    try:
        # 1. One-sentence requests while the big one runs.
        done = threading.Event()
        big_answer: dict = {}

        def send_big() -> None:
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=args.deadline)
            big_answer.update(status=r.status_code, seconds=time.perf_counter() - t0)
            done.set()

        threading.Thread(target=send_big, daemon=True).start()
        time.sleep(2)
        small: list[float] = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(args.small_max):
                if done.is_set():
                    break
                t0 = time.perf_counter()
                r = c.post("/v1/embeddings", json={"model": args.model, "input": big[i % len(big)]})
                small.append(time.perf_counter() - t0 if r.status_code == 200 else float("inf"))
                time.sleep(0.25)
        done.wait(args.deadline)
        big_rate = len(big) / big_answer["seconds"] if big_answer.get("status") == 200 else 0.0
        out["small_behind_big"] = {
            "requests": len(small),
            "latency_s": {k: float(np.percentile(small, q)) for k, q in (("p50", 50), ("p95", 95), ("max", 100))}
            if small else None,
            "big_status": big_answer.get("status"),
            "big_sentences_per_s": big_rate,
            "encode_sentences_per_s": encode_rate,
            "ratio": big_rate / encode_rate,
        }  # fmt: skip

        # 2. A 1 GB body without Content-Length: refused at the limit, memory flat.
        before, peak, stop = rss_mb(server.pid), [0.0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(server.pid))
                time.sleep(0.02)

        sent = [0]

        def gigabyte():
            block = b" " * (1 << 20)
            for _ in range(1024):
                sent[0] += len(block)
                yield block

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = httpx.post(f"{url}/v1/embeddings", content=gigabyte(), timeout=120)
            status = r.status_code
        except httpx.HTTPError as exc:  # the server may close the connection once it has answered
            status = type(exc).__name__
        stop.set()
        sampler.join()
        out["chunked_1gb"] = {"status": status, "bytes_sent": sent[0], "rss_growth_mb": peak[0] - before}

        # 3. SIGTERM while a big request runs.
        done.clear()
        big_answer.clear()
        threading.Thread(target=send_big, daemon=True).start()
        time.sleep(2)
        t0 = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=300)
        done.wait(30)
        out["sigterm"] = {"seconds_to_exit": time.perf_counter() - t0, "exit_code": code,
                          "big_status": big_answer.get("status")}  # fmt: skip
    finally:
        if server.poll() is None:
            server.kill()
    return out


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="prompteol")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds the whole load may take")
    ap.add_argument("--big", type=int, default=2048, help="sentences of the big request (issue 30's targets)")
    ap.add_argument("--small-max", type=int, default=200, help="most 1-sentence requests sent behind it")
    ap.add_argument("--no-fairness", action="store_true", help="skip issue 30's measurements")
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

    server, url = start_server(args.model, args.templates)

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
    if not args.no_fairness:
        pool = list(dict.fromkeys(s for client in requests for req in client for s in req))
        big = [pool[i % len(pool)] for i in range(args.big)]
        report["issue30"] = fair = fairness(args, big)
        behind = fair["small_behind_big"]
        print(
            f"1-sentence requests behind {args.big}: {behind['requests']}, latency {behind['latency_s']}; "
            f"big request {behind['big_sentences_per_s']:.2f} sentences/s, ratio to encode {behind['ratio']:.3f}"
        )
        print(f"1 GB chunked body: {fair['chunked_1gb']}")
        print(f"SIGTERM during a {args.big}-sentence request: {fair['sigterm']}")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
