"""STS-B test at fewer dimensions: the first K coordinates of whitened presets (issue 33, lever 7).

    python benchmarks/dimensions.py --models smollm2-135m,gemma3-270m --presets quality --dims 32,64,128,256,576

For each whitened preset, on all 1,379 STS-B test pairs (Spearman x100 of the cosines):

* K up to the shipped fit's width (``whiten:128``): ``MetaEOL(model, preset=..., truncate_dim=K)``, the product
  path, with the preset's shipped fit;
* K past it: the same vectors whitened by a wider fit (``whiten`` of all dimensions) made the way ``quality.py
  ship`` makes the shipped one (the same generic corpus: the preset's fit sentences of the transfer sets, seed 20,
  no evaluated sentence), then cut to K. Those rows name the fit; nothing of them ships.

Vectors come from the embedding cache (``quality.py``'s runs wrote them: llama.cpp on the shipped file), so a
rerun encodes nothing new. Rows go to ``benchmarks/results/dimensions.json``; ``benchmarks/pages.py`` renders them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
from metaeol_edge.presets import get_preset

from metaeol_edge import MetaEOL, registry
from metaeol_edge import postprocess as pp
from metaeol_edge.evaluation import data_dir, load_sts, pair_cosines, spearman

sys.path.insert(0, str(Path(__file__).parent))
from quality import evaluated_sentences, fit_corpus  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def score(data, vectors: np.ndarray, rows: dict[str, int]) -> float:
    return 100.0 * spearman(pair_cosines(data, {s: vectors[i] for s, i in rows.items()}), data.gold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated registry ids")
    ap.add_argument("--presets", default="quality,metaeol-icl")
    ap.add_argument("--dims", default="32,64,128,256,576")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (quality.py's runs used 2)")
    ap.add_argument("--level", default="shipped", help="the model's level (quality.json's rows: the shipped file)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default=None, help="SentEval folder (default: $METAEOL_DATA or ../shared/senteval)")
    ap.add_argument("--out", type=Path, default=RESULTS / "dimensions.json")
    args = ap.parse_args(argv)
    dims = [int(x) for x in args.dims.split(",")]
    root = data_dir(args.data)
    data = load_sts("stsb", root, "test")
    sentences = data.sentences()
    rows = {s: i for i, s in enumerate(sentences)}
    command = "python benchmarks/dimensions.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out: list[dict] = []
    for model_id in args.models.split(","):
        sha = registry.get_spec(model_id).sha256
        for name in args.presets.split(","):
            preset = get_preset(name).for_model(sha)
            if preset.postprocess is None or pp.parse_kind(preset.postprocess)[0] != "whiten":
                print(f"{name}: {model_id}'s vectors are not whitened ({preset.postprocess}); no rows", file=sys.stderr)
                continue
            with MetaEOL(model_id, preset=name, n_threads=args.threads, level=args.level) as model:
                shipped = model.full_dim
                # The preset's shipped fit, unless this machine's store holds the user's own (which wins).
                source = model.postprocess_source()
                own = source != model.preset.shipped_fit(model.source_fingerprint)
                kind = model.fit_kinds()[0]
                full = model.encode(sentences, batch_size=args.batch_size, show_progress_bar=True)
                for k in (k for k in dims if k <= shipped):
                    cut = model.encode(sentences, batch_size=args.batch_size, truncate_dim=k, show_progress_bar=False)
                    assert np.array_equal(cut, full[:, :k])  # the product path is the prefix of the shipped fit's
                    out.append(dict(model=model_id, preset=name, dims=k, fit=kind,
                                    fit_source=f"this machine's: {source}" if own else "shipped",
                                    stsb=round(score(data, cut, rows), 2)))  # fmt: skip
                    print(json.dumps(out[-1]), flush=True)
            wider = [k for k in dims if k > shipped]
            if not wider:
                continue
            # The shipped fit's corpus, as quality.py ship made it: its sentence count is in the preset's fit_on.
            n_fit = int(re.match(r"generic: (\d+) sentences", preset.fits[model_id].fit_on).group(1))
            corpus = fit_corpus("generic", root, n_fit, evaluated_sentences(root))
            with MetaEOL(
                model_id, templates=preset.templates, layer=preset.layer, n_threads=args.threads, level=args.level
            ) as raw:
                fitted = pp.fit(raw.encode(corpus, batch_size=args.batch_size, show_progress_bar=True), "whiten")
                vectors = fitted.apply(raw.encode(sentences, batch_size=args.batch_size, show_progress_bar=True))
            for k in wider:
                k = min(k, vectors.shape[1])
                out.append(dict(model=model_id, preset=name, dims=k, width=vectors.shape[1], fit="whiten",
                                fit_source=f"generic: {len(corpus)} sentences (seed 20), made here",
                                stsb=round(score(data, vectors[:, :k], rows), 2)))  # fmt: skip
                print(json.dumps(out[-1]), flush=True)
    report = {"command": command, "pairs": len(data.gold), "rows": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
