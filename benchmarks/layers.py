"""Layer sweep: STS-B dev Spearman at every layer, raw and post-processed, and early exit's speed.

    python benchmarks/layers.py [--models smollm2-135m,gemma3-270m] [--pairs 250] [--fit 300]

For each model and template set (MetaEOL, PromptEOL) every layer is read in one
pass (``MetaEOL(layer=[1..n, -1])``). Each layer is scored raw and with
per-dimension standardization fitted on STS-B *train* sentences (never on the
dev sentences it is scored on). Writes ``benchmarks/results/layers.json``,
``layers.md`` and ``layers.png``, then times MetaEOL at each model's best layer
with early exit against the final layer, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from metaeol_edge import MetaEOL
from metaeol_edge import postprocess as pp
from metaeol_edge.evaluation import data_dir, load_sts, pair_cosines, spearman

RESULTS = Path(__file__).resolve().parent / "results"


def sweep(model_id: str, set_name: str, dev, fit_sentences: list[str]) -> dict:
    probe = MetaEOL(model_id, set_name, cache=False)
    n_layer = probe.info.n_layer
    probe.close()
    layers = [*range(1, n_layer + 1), -1]
    dev_sentences = dev.sentences()
    with MetaEOL(model_id, set_name, layer=layers, cache=False, early_exit=False) as model:
        t0 = time.perf_counter()
        per_layer = model.encode(fit_sentences + dev_sentences, show_progress_bar=True)
        seconds = time.perf_counter() - t0
    rows = []
    for layer, vectors in zip(layers, per_layer, strict=True):
        fit_vecs, dev_vecs = vectors[: len(fit_sentences)], vectors[len(fit_sentences) :]
        raw = 100 * spearman(pair_cosines(dev, dict(zip(dev_sentences, dev_vecs, strict=True))), dev.gold)
        std = pp.fit(fit_vecs, "standardize").apply(dev_vecs)
        post = 100 * spearman(pair_cosines(dev, dict(zip(dev_sentences, std, strict=True))), dev.gold)
        rows.append(
            {"layer": layer, "depth": 1.0 if layer == -1 else layer / n_layer, "raw": raw, "standardized": post}
        )
    return {"model": model_id, "templates": set_name, "n_layer": n_layer, "seconds": seconds, "layers": rows}


def best(result: dict, column: str) -> dict:
    return max(result["layers"], key=lambda r: r[column])


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"STS-B dev Spearman x100 ({args.pairs} pairs), raw and standardized (fitted on {args.fit} STS-B train "
        "sentences), per layer. Layer -1 = final layer after the final norm; k = output of block k.",
        "",
        "Command: `python benchmarks/layers.py " + " ".join(sys.argv[1:]) + "`",
        "",
    ]
    for r in results:
        lines += [f"### {r['model']} ({r['n_layer']} blocks), {r['templates']}", ""]
        lines += ["| layer | depth | raw | standardized |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {x['layer']} | {x['depth']:.2f} | {x['raw']:.2f} | {x['standardized']:.2f} |" for x in r["layers"]
        ]
        br, bs = best(r, "raw"), best(r, "standardized")
        final = r["layers"][-1]
        lines += [
            "",
            f"Best raw: layer {br['layer']} (depth {br['depth']:.2f}) {br['raw']:.2f}; best standardized: layer "
            f"{bs['layer']} (depth {bs['depth']:.2f}) {bs['standardized']:.2f}; final layer raw {final['raw']:.2f}.",
            "",
        ]
    return "\n".join(lines)


def early_exit_markdown(speeds: list[dict]) -> str:
    if not speeds:
        return ""
    md = "\n### Early exit (STS-B test sentences, both timed in one run)\n\n"
    md += "Command: `python benchmarks/layers.py " + " ".join(sys.argv[1:]) + "`\n\n"
    md += (
        "| model | templates | layer | STS-B dev (final -> layer) | final layer sent/s | early exit sent/s | ratio |\n"
    )
    md += "|---|---|---:|---|---:|---:|---:|\n"
    for x in speeds:
        md += f"| {x['model']} | {x['templates']} | {x['layer']} | {x['final_raw']:.2f} -> {x['raw']:.2f} | "
        md += f"{x['final']:.2f} | {x['early_exit']:.2f} | {x['early_exit'] / x['final']:.2f}x |\n"
    return md


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, column in zip(axes, ["raw", "standardized"], strict=True):
        for r in results:
            blocks = [x for x in r["layers"] if x["layer"] != -1]
            ax.plot(
                [x["depth"] for x in blocks],
                [x[column] for x in blocks],
                marker=".",
                label=f"{r['model']} {r['templates']}",
            )
        ax.set_title(f"STS-B dev, {column}")
        ax.set_xlabel("depth (block / n_layer)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Spearman x100")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def early_exit_speed(model_id: str, set_name: str, layer: int, sentences: list[str]) -> dict:
    out = {}
    for label, kwargs in (("final layer", {}), (f"layer {layer}, early exit", {"layer": layer})):
        with MetaEOL(model_id, set_name, cache=False, **kwargs) as model:
            model.encode(sentences[:1])  # load (and write the truncated copy) outside the timing
            t0 = time.perf_counter()
            model.encode(sentences, show_progress_bar=False)
            out[label] = len(sentences) / (time.perf_counter() - t0)
    return out


def exit_layer(result: dict, tolerance: float) -> int | None:
    """The shallowest block within ``tolerance`` of the best raw score, if below the last block."""
    top = best(result, "raw")["raw"]
    blocks = [x["layer"] for x in result["layers"] if x["layer"] != -1 and x["raw"] >= top - tolerance]
    layer = min(blocks, default=None)
    return layer if layer is not None and layer < result["n_layer"] else None


def time_early_exit(results: list[dict], args: argparse.Namespace, sentences: list[str]) -> list[dict]:
    speeds = []
    for model_id in dict.fromkeys(r["model"] for r in results):
        mine = [x for x in results if x["model"] == model_id]
        r = next((x for x in mine if x["templates"] == "metaeol"), mine[0])
        layer = exit_layer(r, args.tolerance)
        if layer is None:
            print(f"{model_id}: no block below the last scores within {args.tolerance} of the best; no early exit")
            continue
        s = early_exit_speed(model_id, r["templates"], layer, sentences)
        (final_label, final), (early_label, early) = s.items()
        score = next(x["raw"] for x in r["layers"] if x["layer"] == layer)
        speeds.append(
            {
                "model": model_id,
                "templates": r["templates"],
                "layer": layer,
                "raw": score,
                "final_raw": r["layers"][-1]["raw"],
                "final": final,
                "early_exit": early,
            }
        )
        ratio = early / final
        print(
            f"{model_id} {r['templates']} sentences/s: {final_label} {final:.2f}, "
            f"{early_label} {early:.2f} ({ratio:.2f}x); STS-B dev {r['layers'][-1]['raw']:.2f} -> {score:.2f}"
        )
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--templates", default="metaeol,prompteol")
    ap.add_argument("--pairs", type=int, default=250, help="STS-B dev pairs scored")
    ap.add_argument("--fit", type=int, default=300, help="STS-B train sentences the standardization is fitted on")
    ap.add_argument("--speed-n", type=int, default=48, help="sentences timed for early exit")
    ap.add_argument("--tolerance", type=float, default=1.0, help="early exit: Spearman points given up at most")
    ap.add_argument("--timing-only", action="store_true", help="reuse results/layers.json; time early exit only")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    root = data_dir(args.data)
    if args.timing_only:
        saved = json.loads((RESULTS / "layers.json").read_text())
        saved["early_exit"] = time_early_exit(
            saved["sweeps"], args, load_sts("stsb", root, "test").sentences()[: args.speed_n]
        )
        (RESULTS / "layers.json").write_text(json.dumps(saved, indent=1))
        md = (RESULTS / "layers.md").read_text().split("\n### Early exit")[0].rstrip("\n") + "\n"
        (RESULTS / "layers.md").write_text(md + early_exit_markdown(saved["early_exit"]))
        return
    dev = load_sts("stsb", root, "dev", args.pairs)
    fit_sentences = load_sts("stsb", root, "train").sentences()[: args.fit]
    results = []
    for model_id in args.models.split(","):
        for set_name in args.templates.split(","):
            r = sweep(model_id, set_name, dev, fit_sentences)
            results.append(r)
            br, bs = best(r, "raw"), best(r, "standardized")
            print(
                f"{model_id} {set_name}: final {r['layers'][-1]['raw']:.2f}; best raw layer {br['layer']} "
                f"(depth {br['depth']:.2f}) {br['raw']:.2f}; best standardized layer {bs['layer']} "
                f"(depth {bs['depth']:.2f}) {bs['standardized']:.2f}  [{r['seconds']:.0f} s]",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    speeds = time_early_exit(results, args, load_sts("stsb", root, "test").sentences()[: args.speed_n])
    (RESULTS / "layers.json").write_text(json.dumps({"sweeps": results, "early_exit": speeds}, indent=1))
    md = markdown(results, args)
    md += early_exit_markdown(speeds)
    (RESULTS / "layers.md").write_text(md)
    plot(results, RESULTS / "layers.png")
    print(f"wrote {RESULTS / 'layers.md'}, layers.json, layers.png")


if __name__ == "__main__":
    main()
