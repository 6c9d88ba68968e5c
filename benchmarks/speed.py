"""Sentences per second of MetaEOL.encode and of the naive recipe, side by side in one run.

    python benchmarks/speed.py [--model smollm2-135m] [--n 64] [--templates metaeol]

The naive recipe is the official one computed plainly: one ``Llama.embed`` call
(LAST pooling) per filled-in template, then the mean. Both run on the same
sentences in the same process; the engine runs without the embedding cache.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import stsb_sentences  # noqa: E402

from metaeol_edge import MetaEOL, load_templates, preprocess  # noqa: E402
from metaeol_edge.naive import NaiveRecipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="metaeol")
    ap.add_argument("--n", type=int, default=64, help="STS-B test sentences")
    args = ap.parse_args()
    sentences = stsb_sentences("test", args.n)
    templates = load_templates(args.templates)

    model = MetaEOL(args.model, templates=templates, cache=False)
    model.encode(sentences[:1])  # load the model and warm up outside the timing
    engine = model.engine
    before = engine.tokens_decoded
    t0 = time.perf_counter()
    fast = model.encode(sentences, show_progress_bar=False)
    t_engine = time.perf_counter() - t0
    decoded = engine.tokens_decoded - before
    prompt_tokens = sum(len(engine.tokenize(t.render(preprocess(s)))) for s in sentences for t in templates.templates)
    path = model.model_path
    model.close()

    naive = NaiveRecipe(path, kv_f32=False)  # what a user of llama-cpp-python gets by default
    naive.encode(sentences[:1], templates)
    t0 = time.perf_counter()
    slow = naive.encode(sentences, templates)
    t_naive = time.perf_counter() - t0
    naive.close()

    cos = (fast * slow).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(slow, axis=1)
    n = len(sentences)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {args.model} ({path.name}), templates {args.templates} x{len(templates)}, {n} STS-B test sentences")
    print(f"naive recipe (Llama.embed per prompt): {n / t_naive:6.2f} sentences/s  ({t_naive:.1f} s)")
    print(f"MetaEOL.encode (engine):               {n / t_engine:6.2f} sentences/s  ({t_engine:.1f} s)")
    print(f"speed-up: {t_naive / t_engine:.2f}x")
    print(f"tokens decoded per sentence: engine {decoded / n:.0f} of {prompt_tokens / n:.0f} prompt tokens")
    print(f"cosine to the naive recipe (F16 KV cache, llama.cpp default): min {cos.min():.5f}, mean {cos.mean():.5f}")
    print(f"peak RSS of this process (both paths): {rss:.0f} MB")


if __name__ == "__main__":
    main()
