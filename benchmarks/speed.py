"""Engine speed against the naive recipe and against the CPU's own ceiling, side by side in one run.

    python benchmarks/speed.py [--models smollm2-135m,gemma3-270m] [--n 64] [--templates metaeol]
    python benchmarks/speed.py --models smollm2-135m --levels shipped,f32,f16,q8_0,q4_k_m,q4_1,q4_0 --no-naive

For each model (and quantization level) it prints:
  - sentences/s of the naive recipe (one ``Llama.embed`` call with LAST pooling per
    filled-in template, then the mean; llama-cpp-python's defaults, F16 KV cache)
    and of ``MetaEOL.encode`` (the engine, no embedding cache), and their ratio;
  - new tokens the engine decoded per sentence, of the prompt tokens;
  - the ceiling: the model's prompt-processing rate for one long sequence with
    one output (what llama.cpp can do on this CPU for this model);
  - efficiency = engine sentences/s x tokens decoded per sentence / ceiling;
  - the cosine of the engine's vectors to the naive recipe's, and each path's peak RSS.
Each path runs in its own process (so peak RSS is its own), one after another.
Levels other than ``shipped`` are written once into the model store from the F32
dequantization of the shipped file (``metaeol models quantize``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _proc import peak_rss_mb  # benchmarks/ is on sys.path when a script here runs

HERE = Path(__file__).resolve()
CEILING_TOKENS = 500


def _sentences(n: int) -> list[str]:
    from metaeol_edge.evaluation import data_dir, load_sts

    return load_sts("stsb", data_dir(), "test").sentences()[:n]


def worker(kind: str, model_path: str, templates: str, n: int, out: str) -> dict:
    from metaeol_edge import MetaEOL, load_templates, preprocess
    from metaeol_edge.engine import Prompt

    sentences = _sentences(n)
    ts = load_templates(templates)
    result: dict[str, float] = {}
    if kind == "engine":
        model = MetaEOL(model_path, templates=ts, cache=False)
        model.encode(sentences[:1])  # load and warm up outside the timing
        engine = model.engine
        before = engine.tokens_decoded
        t0 = time.perf_counter()
        vectors = model.encode(sentences, show_progress_bar=False)
        seconds = time.perf_counter() - t0
        result["decoded"] = (engine.tokens_decoded - before) / n
        result["prompt_tokens"] = (
            sum(len(engine.tokenize(t.render(preprocess(s)))) for s in sentences for t in ts.templates) / n
        )
        # The ceiling: one long sequence, one output, no prefix sharing.
        text = " ".join(sentences)
        tokens = engine.tokenize(text)[:CEILING_TOKENS]
        best = 0.0
        for _ in range(3):
            t1 = time.perf_counter()
            engine.embed([Prompt(tokens)])
            best = max(best, len(tokens) / (time.perf_counter() - t1))
        result["ceiling"] = best
        model.close()
    else:
        from metaeol_edge.naive import NaiveRecipe

        naive = NaiveRecipe(model_path, ts, kv_f32=False)  # llama-cpp-python's defaults but for the context size
        naive.encode(sentences[:1], show_progress_bar=False)
        t0 = time.perf_counter()
        vectors = naive.encode(sentences, show_progress_bar=False)
        seconds = time.perf_counter() - t0
        naive.close()
    result["sent_per_s"] = n / seconds
    result["rss_mb"] = peak_rss_mb()
    np.save(out, vectors)
    return result


def run_worker(kind: str, model_path: Path, args: argparse.Namespace, tmp: Path) -> tuple[dict, np.ndarray]:
    out = tmp / f"{kind}.npy"
    cmd = [sys.executable, str(HERE), "--worker", kind, str(model_path), "--templates", args.templates]
    cmd += ["--n", str(args.n), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def _num(row: dict, key: str, fmt: str, width: int) -> str:
    return f"{row[key]:{width}{fmt}}" if key in row else f"{'-':>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--levels", default="shipped", help="comma-separated: shipped, f32, f16, q8_0, q4_k_m, ...")
    ap.add_argument("--templates", default="metaeol")
    ap.add_argument("--n", type=int, default=64, help="STS-B test sentences")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive recipe (slow)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.templates, args.n, args.out)))
        return

    from metaeol_edge import registry

    rows = []
    print(f"{args.n} STS-B test sentences, templates {args.templates}; each path in its own process\n")
    header = (
        f"{'model':<14}{'level':<9}{'MB':>6}{'naive':>8}{'engine':>8}{'ratio':>7}{'decoded':>9}{'of':>5}"
        f"{'ceiling':>9}{'effic.':>8}{'cos min':>9}{'RSS naive':>10}{'RSS eng.':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for model_id in args.models.split(","):
        for level in args.levels.split(","):
            path = registry.resolve_model(model_id) if level == "shipped" else registry.quantized(model_id, level)
            with tempfile.TemporaryDirectory() as tmp:
                eng, fast = run_worker("engine", path, args, Path(tmp))
                naive, slow = (None, None) if args.no_naive else run_worker("naive", path, args, Path(tmp))
            row = {
                "model": model_id,
                "level": level,
                "file": path.name,
                "size_mb": path.stat().st_size / 1e6,
                "engine_sent_per_s": eng["sent_per_s"],
                "decoded_per_sentence": eng["decoded"],
                "prompt_tokens_per_sentence": eng["prompt_tokens"],
                "ceiling_tok_per_s": eng["ceiling"],
                "efficiency": eng["sent_per_s"] * eng["decoded"] / eng["ceiling"],
                "engine_rss_mb": eng["rss_mb"],
            }
            if naive is not None:
                cos = (fast * slow).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(slow, axis=1)
                row |= {
                    "naive_sent_per_s": naive["sent_per_s"],
                    "ratio": eng["sent_per_s"] / naive["sent_per_s"],
                    "cos_min": float(cos.min()),
                    "naive_rss_mb": naive["rss_mb"],
                }
            rows.append(row)

            ratio = _num(row, "ratio", ".2f", 6) + ("x" if "ratio" in row else " ")
            print(
                f"{model_id:<14}{level:<9}{row['size_mb']:>6.0f}{_num(row, 'naive_sent_per_s', '.2f', 8)}"
                f"{row['engine_sent_per_s']:>8.2f}{ratio}{row['decoded_per_sentence']:>9.0f}"
                f"{row['prompt_tokens_per_sentence']:>5.0f}{row['ceiling_tok_per_s']:>9.0f}{row['efficiency']:>8.2f}"
                f"{_num(row, 'cos_min', '.5f', 9)}{_num(row, 'naive_rss_mb', '.0f', 10)}{row['engine_rss_mb']:>9.0f}",
                flush=True,
            )
    print(
        "\nnaive/engine: sentences/s; ratio = engine / naive; decoded: new tokens the engine decoded per sentence, "
        "of the prompt tokens; ceiling: tokens/s for one long sequence with one output; efficiency = engine x "
        "decoded / ceiling; cos min: engine vs naive (F16 KV) per sentence; RSS in MB (peak, per process)."
    )
    if len(rows) > 1 and args.levels != "shipped":
        for model_id in args.models.split(","):
            mine = [r for r in rows if r["model"] == model_id]
            fastest = max(mine, key=lambda r: r["engine_sent_per_s"])
            print(f"fastest level for {model_id} on this CPU: {fastest['level']} ({fastest['engine_sent_per_s']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
