"""A cold run and a warm run of the embedding cache, side by side in one invocation.

    python benchmarks/cache.py [--model smollm2-135m] [--n 1000]

Embeds N distinct STS-B sentences into an empty cache (cold), then again with a
new MetaEOL instance on the same cache (warm, as a rerun would), checks that the
vectors are identical, and reports the bytes each cached vector costs on disk,
for float32 and float16 entries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from metaeol_edge.cache import EmbeddingCache

from metaeol_edge import EncodeStats, MetaEOL
from metaeol_edge.evaluation import data_dir, load_sts


def timed_run(
    model_id: str, cache_path: Path, sentences: list[str], dtype: str
) -> tuple[np.ndarray, float, MetaEOL, EncodeStats]:
    t0 = time.perf_counter()
    model = MetaEOL(model_id, cache=cache_path, cache_dtype=dtype)
    stats = EncodeStats()
    vectors = model.encode(sentences, per_template=True, show_progress_bar=True, stats=stats)
    return vectors, time.perf_counter() - t0, model, stats


def bytes_per_vector(path: Path) -> tuple[int, float]:
    cache = EmbeddingCache(path)
    cache.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    entries = cache.stats()["entries"]
    cache.close()
    return entries, path.stat().st_size / entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    sentences = load_sts("stsb", data_dir(), "test").sentences()[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        path32, path16 = Path(tmp) / "f32.sqlite3", Path(tmp) / "f16.sqlite3"
        cold, t_cold, m, stats = timed_run(args.model, path32, sentences, "float32")
        cold_misses, dim, n_t = stats.misses, m.dim, len(m.templates)
        m.close()
        warm, t_warm, m, stats = timed_run(args.model, path32, sentences, "float32")
        warm_hits, warm_misses = stats.hits, stats.misses
        m.close()

        # float16 entries: the same vectors stored at half width under float16 keys
        # (not recomputed), to measure what a float16 cache costs on disk.
        m16 = MetaEOL(args.model, cache=EmbeddingCache(path16), cache_dtype="float16")
        m16.cache.put_many(
            [
                (key, args.model, t.task, cold[i, j])
                for i, s in enumerate(sentences)
                for j, (t, key) in enumerate(zip(m16.templates.templates, m16.cache_keys(s), strict=True))
            ]
        )
        m16.close()
        entries32, b32 = bytes_per_vector(path32)
        entries16, b16 = bytes_per_vector(path16)

    n = len(sentences)
    print(f"model {args.model}, metaeol x{n_t}, {n} distinct STS-B test sentences, dim {dim}")
    print(f"cold run: {t_cold:8.2f} s  ({n / t_cold:.2f} sentences/s, {cold_misses} prompt vectors computed)")
    print(f"warm run: {t_warm:8.2f} s  ({warm_hits} hits, {warm_misses} misses)")
    print(f"warm run is {t_cold / t_warm:.0f}x faster; vectors identical: {np.array_equal(cold, warm)}")
    print(f"float32 cache: {entries32} entries, {b32:.0f} bytes per vector on disk (4 x dim = {4 * dim})")
    print(f"float16 cache: {entries16} entries, {b16:.0f} bytes per vector on disk (2 x dim = {2 * dim})")


if __name__ == "__main__":
    main()
