"""Training-free quality levers, measured on full STS sets (issue 20).

    python benchmarks/quality.py dev  --model smollm2-135m --templates prompteol,pretcot,ke
    python benchmarks/quality.py test --model smollm2-135m --templates prompteol --tasks stsb,sickr
    python benchmarks/quality.py speed --model smollm2-135m --templates prompteol,metaeol
    python benchmarks/quality.py ship --preset quality --model gemma3-270m

A template set may carry Token Prepending: ``prompteol+tp:1:4`` rewrites blocks
1..3. Issue 33's lever 2 has two forms: ``prompteol~cp-aux:0.5`` subtracts half of
the auxiliary set's states from the main set's at each layer read (after the
pass, on the engine's vectors), and ``prompteol+cp:4:0.5`` runs Contrastive
Prompting as its authors do, steering block 4's attention values inside the pass
(``_steering.py``, PyTorch; ``prompteol+pt`` is the same PyTorch pass unsteered).

``dev`` scores every (template set, layer or pair of layers, lever) on the dev
data (a seeded sample of STS-B dev pairs) and names the best; ``test`` scores on
the full test sets a fixed list of rows (the final layer with each lever) plus
the dev choice of each template set, and never chooses anything itself;
``speed`` times each template set alone on a seeded random sample of STS-B
test sentences, cache off; ``ship`` fits a preset's post-processing on the
generic corpus and writes it into ``presets/`` for the model.

Levers are post-processing fits (:mod:`metaeol_edge.postprocess`) made on
unlabeled text that shares no sentence with any evaluated pair:

* ``generic``: a seeded sample of the transfer sets' sentences (MR, CR, MPQA,
  SST-2, TREC, MRPC), the same for every task;
* ``in-domain``: the task's own train split (STS-B train, SICK train), only
  for the task it belongs to.

Every vector comes from the embedding cache, so a rerun re-encodes nothing.
Rows are merged into ``OUT/quality.json`` (keyed by model, method, lever,
fit_on, layer, split, task) and ``quality.md`` / ``quality.png`` are rewritten
from it. The file holds each run's command once: ``{"runs": [{"command": ...,
"rows": [...]}, ...]}`` (:func:`load_rows` gives the rows back with their
``command``). ``--save-dir`` writes each row's post-processed vectors in
``benchmarks/rescore.py``'s layout (float16), and ``--save-fits`` the fits, so
every score can be recomputed from files alone.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from metaeol_edge.presets import get_preset
from metaeol_edge.prompts import TemplateSet, load_templates

from metaeol_edge import MetaEOL, registry
from metaeol_edge import postprocess as pp
from metaeol_edge.evaluation import STS_YEARS, STSData, data_dir, load_sts, load_transfer, run_sts
from metaeol_edge.methods import TokenPrepending
from metaeol_edge.methods.layers import ATTENTION

sys.path.insert(0, str(Path(__file__).parent))
from _markdown import cell, table  # noqa: E402
from _vectors import MODES, Store  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PRESETS = Path(__file__).resolve().parents[1] / "presets"
LEVERS = (
    "raw",
    "center",
    "standardize",
    "whiten",
    "whiten:64",
    "whiten:128",
    "whiten:256",
    "abtt:1",
    "abtt:5",
    "abtt:10",
)
IN_DOMAIN = {"stsb": "stsb", "sickr": "sickr"}  # task -> the train split fitted on for it
GENERIC_TASKS = ("mr", "cr", "mpqa", "sst2", "trec", "mrpc")
SEED = 20


# -- data ----------------------------------------------------------------------------------


def evaluated_sentences(root: Path) -> set[str]:
    """Every sentence of every pair that is scored here (test sets, and the dev sets used for choices)."""
    seen: set[str] = set()
    for task in (*STS_YEARS, "stsb", "sickr"):
        seen.update(load_sts(task, root, "test").sentences())
    seen.update(load_sts("stsb", root, "dev").sentences())
    seen.update(load_sts("sickr", root, "dev").sentences())
    return seen


def _sample(sentences: list[str], n: int, exclude: set[str], seed: int) -> list[str]:
    pool = sorted({s.strip() for s in sentences if s.strip()} - exclude)
    random.Random(seed).shuffle(pool)
    return pool[:n]


def fit_corpus(name: str, root: Path, n: int, exclude: set[str]) -> list[str]:
    """A fitting corpus: ``generic`` or the train split of ``stsb`` / ``sickr``, none of ``exclude`` in it.

    The order is a seeded shuffle, so a corpus of n sentences is the first n of a larger one.
    """
    if name == "generic":
        pool = [s for task in GENERIC_TASKS for s in load_transfer(task, root).sentences()]
    else:
        pool = load_sts(name, root, "train").sentences()
    return _sample(pool, n, exclude, SEED)


def dev_data(root: Path, pairs: int) -> STSData:
    """A seeded sample of STS-B dev pairs (the whole set is ~3,000 sentences)."""
    full = load_sts("stsb", root, "dev")
    keep = sorted(random.Random(SEED).sample(range(len(full)), min(pairs, len(full))))
    return STSData("stsb", [full.a[i] for i in keep], [full.b[i] for i in keep], full.gold[keep])


# -- vectors ---------------------------------------------------------------------------------


class Vectors(Store):
    """One template set's vectors at several layers, read in one pass and kept by sentence."""

    def __init__(self, model: str, spec: str, layers: list[int | str], batch_size: int, threads: int | None) -> None:
        templates, method = parse_spec(spec)
        self.embedder = MetaEOL(model, templates=templates, method=method, layer=layers, cache=True, n_threads=threads)
        self.spec = spec
        self.layers = list(self.embedder.layers)
        self.batch_size = batch_size
        self.start(self.embedder.dim)

    def read(self, sentences: list[str]) -> list[np.ndarray]:
        return self.embedder.encode(sentences, batch_size=self.batch_size, show_progress_bar=True)


class Contrast:
    """Lever 2 of issue 33, read after the pass: a main set's state minus ``alpha`` times an auxiliary set's
    (``prompteol-icl-music~cp-aux:0.5``), at the same layer, each read as ``Vectors`` reads a set.

    Contrastive Prompting (arXiv 2505.12831) subtracts inside the forward pass, at one block's attention
    values, and reads a later layer; this is the subtraction on the states a layer already gives, which the
    engine can do with no change to its graph."""

    def __init__(self, model: str, spec: str, layers: list[int | str], batch_size: int, threads: int | None) -> None:
        main, _, rest = spec.partition("~")
        aux, _, alpha = rest.partition(":")
        self.spec = spec
        self.alpha = float(alpha or 1.0)
        self.main = Vectors(model, main, layers, batch_size, threads)
        self.aux = Vectors(model, aux, layers, batch_size, threads)
        self.layers = self.main.layers

    def need(self, sentences: list[str], label: str) -> None:
        self.main.need(sentences, label)
        self.aux.need(sentences, label)

    def get(self, sentences: list[str], option: tuple[int | str, ...]) -> np.ndarray:
        return (self.main.get(sentences, option) - self.alpha * self.aux.get(sentences, option)).astype(np.float32)


def is_steered(spec: str) -> bool:
    """``a+cp:ACT:COEFF`` or its unsteered baseline ``a+pt``: read by ``_steering.py`` in PyTorch."""
    return "+cp:" in spec or spec.endswith("+pt")


def vectors_for(model: str, spec: str, layers: list[int | str], batch_size: int, threads: int | None):
    """What reads a spec: ``a~b:alpha`` a :class:`Contrast`, ``a+cp:ACT:COEFF`` Contrastive Prompting steered
    inside the forward pass (``_steering.py``, PyTorch), anything else :class:`Vectors`."""
    if is_steered(spec):
        from _steering import SteeredVectors

        return SteeredVectors(model, spec, layers, batch_size, threads)
    return (Contrast if "~" in spec else Vectors)(model, spec, layers, batch_size, threads)


def parse_spec(spec: str) -> tuple[TemplateSet, TokenPrepending | None]:
    """``prompteol`` -> the template set; ``ke&prompteol-icl-music`` -> both sets' templates, averaged
    (their cache entries are each set's own); ``prompteol+tp:1:4`` -> Token Prepending over it, blocks 1..3."""
    names, _, method = spec.partition("+")
    parts = [load_templates(n) for n in names.split("&")]
    templates = TemplateSet(names, tuple(t for p in parts for t in p.templates), parts[0].source)
    if not method:
        return templates, None
    name, _, layers = method.partition(":")
    if name != "tp":
        raise SystemExit(f"unknown method in {spec!r}: only +tp:START:STOP")
    start, stop = (int(x) for x in layers.split(":"))
    return templates, TokenPrepending(templates, start, stop)


def layer_name(option: tuple[int | str, ...]) -> str:
    """``final``, ``30``, ``attn:22-30`` (the attention outputs of blocks 22..30, averaged: AlignedWVA),
    ``29+24`` (averaged), ``cat:29+24`` (concatenated) or ``unit:29+24`` (each vector at unit length, then
    averaged): the option leads with a marker of :data:`_vectors.MODES` for the last two."""
    prefix = next((f"{name}:" for name, marker in MODES.items() if option[0] == marker), "")
    layers = option[1:] if prefix else option
    return prefix + "+".join("final" if layer == -1 else str(layer) for layer in layers)


# -- scoring ---------------------------------------------------------------------------------


def score(
    data: STSData,
    vectors: Vectors,
    option: tuple[int | str, ...],
    lever: str,
    fit_sentences: list[str] | None,
    save: Path | None,
    fits_dir: Path | None,
) -> float:
    x = vectors.get(data.sentences(), option)
    if lever != "raw":
        fitted = pp.fit(vectors.get(fit_sentences, option), lever)
        x = fitted.apply(x)
        if fits_dir is not None:
            pp.save(fitted, fits_dir / f"{data.name}.npz", {"layer": layer_name(option), "task": data.name})
    lookup = dict(zip(data.sentences(), x, strict=True))
    return run_sts(data, lambda s: np.stack([lookup[t] for t in s]), save_dir=save, save_dtype=np.float16)["score"]


def result_row(
    model: str,
    templates: str,
    option: tuple[int | str, ...],
    lever: str,
    fit_on: str,
    split: str,
    data: STSData,
    spearman: float,
    corpus: list[str] | None,
) -> dict:
    """One scored row of quality.json (the keys the report, merge and rescore read)."""
    return dict(
        model=model,
        method=templates,
        lever=lever,
        fit_on=fit_on,
        layer=layer_name(option),
        split=split,
        task=data.name,
        pairs=len(data),
        spearman=round(spearman, 2),
        fit_sentences=len(corpus) if corpus else 0,
    )


def model_name(model: str) -> str:
    """What rows and folders call a model: a registry id as it is, a .gguf path by its file name (a path's
    folders would make the saved vectors' folder an absolute path, outside ``--save-dir``)."""
    return Path(model).name if model.endswith(".gguf") else model


def row_dir(base: Path | None, *parts: str) -> Path | None:
    if base is None:
        return None
    return base.joinpath(*[p.replace(":", "-").replace("+", "_") for p in parts])


# -- stages ----------------------------------------------------------------------------------


def run_dev(args, root: Path, exclude: set[str]) -> list[dict]:
    dev = dev_data(root, args.dev_pairs)
    corpora = {"generic": fit_corpus("generic", root, args.dev_fit, exclude)}
    if args.dev_in_domain:  # STS-B train: the in-domain corpus of the test stage (as many sentences)
        corpora["in-domain"] = fit_corpus("stsb", root, args.fit_sentences, exclude)
    rows = []
    for templates in args.templates:
        vec = vectors_for(args.model, templates, args.layers, args.batch_size, args.threads)
        vec.need(dev.sentences(), "STS-B dev")
        for name, corpus in corpora.items():
            vec.need(corpus, f"the {name} corpus")
        singles = [(layer,) for layer in vec.layers]
        options = singles + list(combinations(vec.layers, 2))
        if args.concat:  # lever 4's other ensemble: two layers side by side, twice the width
            options += [(MODES["cat"], *pair) for pair in combinations(vec.layers, 2)]
        if args.unit:  # the average an embedder can make alone: no scale measured on other sentences
            options += [(MODES["unit"], *pair) for pair in combinations(vec.layers, 2)]
        if args.unit3:  # three reads so: two layers and an attention span, say
            options += [(MODES["unit"], *three) for three in combinations(vec.layers, 3)]
        for option in options:
            for lever in LEVERS:
                for fit_on, corpus in [("none", None)] if lever == "raw" else corpora.items():
                    try:
                        s = score(dev, vec, option, lever, corpus, None, None)
                    except ValueError as exc:  # e.g. whitening with fewer sentences than dimensions
                        print(f"  skipped {lever} at {layer_name(option)}: {exc}", file=sys.stderr)
                        continue
                    rows.append(
                        result_row(model_name(args.model), templates, option, lever, fit_on, "dev", dev, s, corpus)
                    )
    # Per template set: one choice of a single layer (what a preset can name) and one of a pair of
    # layers, with the generic fit or none; and, with --dev-in-domain, one with the in-domain fit.
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        kind = "in-domain" if r["fit_on"] == "in-domain" else "pair" if "+" in r["layer"] else "single"
        key = (r["method"], kind)
        if key not in best or r["spearman"] > best[key]["spearman"]:
            best[key] = r
    for (method, kind), r in sorted(best.items()):
        r["dev_choice"] = kind
        print(
            f"dev choice for {method} ({kind}): layer {r['layer']}, {r['lever']}, fit on {r['fit_on']} "
            f"-> {r['spearman']:.2f}"
        )
    # Which template set to carry to test (a subset of MetaEOL's templates, say) is a dev choice too.
    singles = [r for (_, kind), r in best.items() if kind == "single"]
    if len(singles) > 1:
        top = max(singles, key=lambda r: r["spearman"])
        print(
            f"best template set on dev: {top['method']} (layer {top['layer']}, {top['lever']}) -> {top['spearman']:.2f}"
        )
    return rows


def dev_choices(rows: list[dict], model: str) -> dict[str, list[tuple[str, str, str]]]:
    """template set -> [(layer, lever, kind of choice)] chosen on dev, from earlier dev rows."""
    chosen: dict[str, list[tuple[str, str, str]]] = {}
    for r in rows:
        if r["split"] == "dev" and r.get("dev_choice") and r["model"] == model:
            chosen.setdefault(r["method"], []).append((r["layer"], r["lever"], r["dev_choice"]))
    return chosen


def parse_layer_name(name: str) -> tuple[int | str, ...]:
    """:func:`layer_name` read back: ``unit:29+24+attn:22-30`` -> (UNIT, 29, 24, "attn:22-30")."""
    mode, sep, rest = name.partition(":")
    if sep and mode in MODES:
        return (MODES[mode], *parse_layer_name(rest))
    return tuple(parse_read(p) for p in name.split("+"))


def parse_read(text: str) -> int | str:
    """One read as rows and ``--layers`` name it: ``final`` or -1, a block, or an attention span ``attn:22-30``."""
    text = text.strip()
    if text == "final":
        return -1
    return text if text.startswith(ATTENTION) else int(text)


def run_test(args, root: Path, exclude: set[str], previous: list[dict]) -> list[dict]:
    model_id = model_name(args.model)
    choices = dev_choices(previous, model_id)
    rows = []
    fits = {"generic": fit_corpus("generic", root, args.fit_sentences, exclude)}
    in_domain = [t for t in args.tasks if t in IN_DOMAIN and not args.generic_only]
    for task in in_domain:
        fits[task] = fit_corpus(IN_DOMAIN[task], root, args.fit_sentences, exclude)
    for templates in args.templates:
        # Read every layer a dev choice names too (a pair such as 28+24), in the same pass.
        named = [x for layer, _, _ in choices.get(templates, []) for x in parse_layer_name(layer)]
        named = [x for x in named if x not in MODES.values()]  # the markers of cat: and unit: are not layers
        layers = list(dict.fromkeys(args.layers + named))
        vec = vectors_for(args.model, templates, layers, args.batch_size, args.threads)
        for name, corpus in fits.items():
            vec.need(corpus, f"the {name} fitting corpus")
        # (layers, lever, fit, dev choice or None): the final layer with every lever, and the dev choices.
        plan: list[tuple[tuple[int | str, ...], str, str, str | None]] = []
        for lever in args.levers:
            plan += [((-1,), lever, f, None) for f in (["none"] if lever == "raw" else ["generic", "in-domain"])]
        for layer, lever, kind in choices.get(templates, []):
            option = parse_layer_name(layer)
            fits_of = ["none"] if lever == "raw" else ["in-domain"] if kind == "in-domain" else ["generic"]
            plan = [p for p in plan if p[:3] not in [(option, lever, f) for f in fits_of]]
            plan += [(option, lever, f, kind) for f in fits_of]
        for task in args.tasks:
            data = load_sts(task, root, "test")
            vec.need(data.sentences(), f"{task} test")
            for option, lever, fit_on, chosen in plan:
                if fit_on == "in-domain" and task not in in_domain:
                    continue
                corpus = None if fit_on == "none" else fits["generic" if fit_on == "generic" else task]
                where = row_dir(args.save_dir, model_id, templates, layer_name(option), lever, fit_on)
                fits_dir = row_dir(args.save_fits, model_id, templates, layer_name(option), lever, fit_on)
                try:
                    s = score(data, vec, option, lever, corpus, where and where / task, fits_dir)
                except ValueError as exc:  # e.g. whitening with fewer sentences than dimensions
                    print(f"  skipped {lever} fitted on {fit_on} for {task}: {exc}", file=sys.stderr)
                    continue
                row = result_row(model_id, templates, option, lever, fit_on, "test", data, s, corpus)
                rows.append(row | {"dev_choice": chosen})
                print(f"{templates:>24} {task:>6} {layer_name(option):>8} {lever:>11} {fit_on:>9} {s:6.2f}")
    return rows


def run_ship(args, root: Path, exclude: set[str]) -> None:
    """Fit a preset's post-processing on the generic corpus and ship it (``presets/``) for this model."""
    preset = get_preset(args.preset).for_model(registry.get_spec(args.model).sha256)
    if not preset.current:  # its fits are what collections made with it were embedded with: never remade
        raise SystemExit(f"{args.preset} is an earlier revision of preset {preset.name}: ship the current one")
    if preset.postprocess is None:
        print(f"preset {preset.name} applies no post-processing to {args.model}: nothing to fit")
        return
    corpus = fit_corpus("generic", root, args.fit_sentences, exclude)
    with MetaEOL(
        args.model, templates=preset.templates, layer=preset.layer, cache=True, n_threads=args.threads
    ) as model:
        fitted = pp.fit(model.encode(corpus, batch_size=args.batch_size, show_progress_bar=True), preset.postprocess)
        source = model.source_fingerprint
    # Named by revision after the first, so a new revision never overwrites the fit of one that is kept.
    name = f"{args.model}.{preset.name}" + (f"-{preset.revision}" if preset.revision > 1 else "") + ".npz"
    fit_on = f"generic: {len(corpus)} sentences of the transfer sets MR, CR, MPQA, SST-2, TREC, MRPC (seed {SEED})"
    meta = {"model": args.model, "templates": preset.templates, "layer": preset.layer, "fit_on": fit_on}
    pp.save(fitted, PRESETS / name, meta)
    data = json.loads((PRESETS / "presets.json").read_text())
    data["presets"][preset.name].setdefault("fits", {})[args.model] = {
        "file": name,
        # What a preset looks its fit up by: the file as shipped, not a level derived from it here.
        "sha256": source,
        "fit_on": fit_on,
    }
    (PRESETS / "presets.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {PRESETS / name} ({preset.postprocess}, fitted on {len(corpus)} sentences)")


def run_speed(args, root: Path) -> list[dict]:
    sentences = load_sts("stsb", root, "test").sentences()
    sample = random.Random(SEED).sample(sentences, min(args.speed_n, len(sentences)))
    rows = []
    for templates in args.templates:
        for option in args.speed_layers:
            run, close = speed_reader(args, templates, option)
            run(sample[:4])  # load, and warm the template prefixes
            t0 = time.perf_counter()
            run(sample)
            rate = len(sample) / (time.perf_counter() - t0)
            close()
            name = layer_name(option)
            rows.append(
                dict(
                    model=model_name(args.model),
                    method=templates,
                    layer=name,
                    split="speed",
                    task="stsb",
                    pairs=0,
                    lever="-",
                    fit_on="-",
                    spearman=None,
                    sentences_per_s=round(rate, 2),
                    speed_sentences=len(sample),
                )
            )
            print(f"{templates:>24} layer {name:>6}: {rate:.2f} sentences/s")
    return rows


def speed_reader(args, spec: str, option: tuple[int | str, ...]):
    """(encode these sentences, close) for one spec at one read, cache off, as its rows are read: a contrast
    encodes both sets (their union's cost), a steered spec runs both PyTorch passes, a ``unit:`` option is the
    embedder's ``combine_layers`` over its reads."""
    combine = option[0] == MODES["unit"]
    if combine and len(option) < 3:
        raise SystemExit(f"--speed-layers: {layer_name(option)} combines one read; use unit:A+B")
    if len(option) > 1 and not combine:
        raise SystemExit(f"--speed-layers: {layer_name(option)} is no read the embedder makes; use unit:A+B")
    layer = list(option[1:]) if combine else option[0]
    if is_steered(spec):
        if combine:
            raise SystemExit("a steered spec is timed at one layer")
        steered = vectors_for(args.model, spec, [layer], args.batch_size, args.threads)
        return steered.read, lambda: None
    if "~" in spec:
        main, _, rest = spec.partition("~")
        spec = main + "&" + rest.partition(":")[0]
    names, method = parse_spec(spec)
    model = MetaEOL(
        args.model,
        templates=names,
        method=method,
        layer=layer,
        combine_layers=combine,
        cache=False,
        n_threads=args.threads,
    )
    return (lambda s: model.encode(s, batch_size=args.batch_size, show_progress_bar=False)), model.close


# -- reports ---------------------------------------------------------------------------------

KEY = ("model", "method", "lever", "fit_on", "layer", "split", "task")


def load_rows(path: Path) -> list[dict]:
    """quality.json's rows, each with the ``command`` of its run; [] if there is no file.

    The file is ``{"runs": [{"command": ..., "rows": [...]}, ...]}``; a plain list of
    rows (the format before the runs were grouped) is read too.
    """
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data
    return [row | {"command": run["command"]} for run in data["runs"] for row in run["rows"]]


def save_rows(path: Path, rows: list[dict]) -> None:
    """Write rows grouped by their run's command (in order of first appearance), the command once per run."""
    runs: dict[str | None, list[dict]] = {}
    for r in rows:
        runs.setdefault(r.get("command"), []).append({k: v for k, v in r.items() if k != "command"})
    data = {"runs": [{"command": command, "rows": group} for command, group in runs.items()]}
    path.write_text(json.dumps(data, indent=1) + "\n")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old ones with the same key; a new dev run replaces that template set's dev choice."""
    keys = {tuple(r[k] for k in KEY) for r in new}
    redone = {(r["model"], r["method"]) for r in new if r["split"] == "dev"}
    kept = []
    for r in old:
        if tuple(r[k] for k in KEY) in keys:
            continue
        if r["split"] == "dev" and (r["model"], r["method"]) in redone:
            continue
        kept.append(r)
    return kept + new


def speeds(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    return {(r["model"], r["method"], r["layer"]): r["sentences_per_s"] for r in rows if r["split"] == "speed"}


def write_md(rows: list[dict], path: Path) -> None:
    rate = speeds(rows)
    lines = [
        "# Training-free quality levers (issue 20)",
        "",
        "Spearman x100 of cosine against gold on the full test sets (SentEval 'all' setting).",
        "lever: post-processing fitted on `fit_on` text that shares no sentence with any evaluated pair",
        "(generic: the transfer sets' sentences; in-domain: the task's train split). `dev, single` and",
        "`dev, pair` mark the layer (or pair of layers) and lever each template set's dev run chose",
        "(seeded sample of STS-B dev pairs, generic fit); every other row is the final layer with each lever.",
        "sent/s: `python benchmarks/quality.py speed`, cache off, 2 cores, seeded random STS-B test sentences.",
        "",
    ]
    tests = [r for r in rows if r["split"] == "test"]
    by = {}
    for r in tests:
        by.setdefault((r["model"], r["method"], r["layer"], r["lever"], r["fit_on"]), {})[r["task"]] = r
    table_rows = []
    for (model, method, layer, lever, fit_on), tasks in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        years = [tasks[t]["spearman"] for t in (*STS_YEARS, "stsb", "sickr") if t in tasks]
        avg = sum(years) / 7 if len(years) == 7 else None
        chosen = next((r["dev_choice"] for r in tasks.values() if r.get("dev_choice")), "")
        spd = rate.get((model, method, layer), rate.get((model, method, "final")))
        table_rows.append(
            [
                model,
                method,
                layer,
                lever,
                fit_on,
                f"dev, {chosen}" if chosen else "",
                cell(tasks.get("stsb", {}).get("spearman")),
                cell(tasks.get("sickr", {}).get("spearman")),
                cell(avg),
                cell(spd),
            ]
        )
    lines += table(
        ["model", "method", "layer", "lever", "fit on", "choice", "STS-B", "SICK-R", "7-set avg", "sent/s"],
        table_rows,
        6,
    )
    dev = [r for r in rows if r["split"] == "dev" and r.get("dev_choice")]
    if dev:
        lines += ["", "Dev choices (STS-B dev sample):", ""]
        lines += table(
            ["model", "method", "layer", "lever", "pairs", "STS-B dev"],
            [[r["model"], r["method"], r["layer"], r["lever"], str(r["pairs"]), cell(r["spearman"])] for r in dev],
            4,
        )
    commands = sorted({r["command"] for r in rows if r.get("command")})
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in commands]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [r for r in rows if r["split"] == "test" and r["task"] == "stsb" and r["fit_on"] != "in-domain"]
    tests.sort(key=lambda r: r["spearman"])
    if not tests:
        return
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(tests) + 1.2))
    labels = [f"{r['model']} {r['method']} L{r['layer']} {r['lever']}" for r in tests]
    ax.barh(range(len(tests)), [r["spearman"] for r in tests], color="tab:blue")
    ax.axvline(82.03, color="tab:red", linestyle="--", label="all-MiniLM-L6-v2 (82.03)")
    ax.set_yticks(range(len(tests)), labels, fontsize=7)
    ax.set_xlabel("STS-B test, Spearman x100 (generic fit or none)")
    ax.set_xlim(min(r["spearman"] for r in tests) - 5, 85)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["dev", "test", "speed", "ship", "report"])
    ap.add_argument("--preset", default="quality", help="the preset whose fit `ship` makes")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--templates", default="prompteol", help="comma-separated template sets")
    ap.add_argument(
        "--layers",
        default="-1,30,29,24,20,16",
        help="reads in one pass: layers (-1: final) and attention spans (attn:22-30, issue 33's lever 5)",
    )
    ap.add_argument("--tasks", default="stsb,sickr", help="test tasks (stsb, sickr, sts12..sts16)")
    ap.add_argument("--levers", default="raw,center,standardize,whiten,whiten:128,abtt:10")
    ap.add_argument("--dev-pairs", type=int, default=500)
    ap.add_argument("--dev-fit", type=int, default=1000, help="generic sentences fitted on in the dev stage")
    ap.add_argument("--dev-in-domain", action="store_true", help="dev: also fit on STS-B train, and choose with it")
    ap.add_argument("--concat", action="store_true", help="dev: also score each pair of layers concatenated")
    ap.add_argument("--unit", action="store_true", help="dev: also average each pair of unit-length vectors")
    ap.add_argument("--unit3", action="store_true", help="dev: also average each triple of unit-length vectors")
    ap.add_argument("--fit-sentences", type=int, default=3000, help="sentences per fitting corpus (test stage)")
    ap.add_argument("--generic-only", action="store_true", help="test: no in-domain fits")
    ap.add_argument("--speed-n", type=int, default=128)
    ap.add_argument("--speed-layers", default="-1", help="reads timed: -1, 30, attn:22-30, unit:29+24 (combined)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    ap.add_argument("--data", default=None, help="SentEval folder (default: $METAEOL_DATA or ../shared/senteval)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--save-dir", type=Path, default=None, help="write each test row's vectors for rescore.py")
    ap.add_argument("--save-fits", type=Path, default=None, help="write each test row's fit (.npz)")
    args = ap.parse_args(argv)
    args.templates = [t for t in args.templates.split(",") if t]
    args.layers = [parse_read(x) for x in args.layers.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.levers = [x for x in args.levers.split(",") if x]
    args.speed_layers = [parse_layer_name(x) for x in args.speed_layers.split(",")]
    for lever in args.levers:
        if lever != "raw":
            pp.parse_kind(lever)
    out = args.output / "quality.json"
    previous = load_rows(out)
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    root = data_dir(args.data)
    if args.stage == "ship":
        run_ship(args, root, evaluated_sentences(root))
        return 0
    if args.stage == "report":
        new = []
    elif args.stage == "speed":
        new = run_speed(args, root)
    else:
        exclude = evaluated_sentences(root)
        new = run_dev(args, root, exclude) if args.stage == "dev" else run_test(args, root, exclude, previous)
    for r in new:
        r["command"] = command
    # Read the file again: another run may have added rows since this one started.
    rows = merge(load_rows(out), new)
    args.output.mkdir(parents=True, exist_ok=True)
    save_rows(out, rows)
    write_md(rows, args.output / "quality.md")
    plot(rows, args.output / "quality.png")
    print(f"wrote {out} ({len(rows)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
