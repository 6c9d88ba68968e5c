"""The ``metaeol`` command: it parses arguments, calls the library, and prints."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from metaeol_edge import __version__
from metaeol_edge.backends.torch import DTYPES as REFERENCE_DTYPES
from metaeol_edge.core.cache import EmbeddingCache, default_path
from metaeol_edge.core.config import EmbedConfig
from metaeol_edge.errors import InputError, MetaEOLError
from metaeol_edge.faces.bulk import DEFAULT_SHARD_SIZE
from metaeol_edge.faces.corpus import FORMATS, read_sentences
from metaeol_edge.methods.layers import ATTENTION
from metaeol_edge.models import registry, resolve, store

EXAMPLES = [
    "A man is playing a guitar.",
    "Someone is making music on a string instrument.",
    "A chef is slicing vegetables in a kitchen.",
    "The stock market fell sharply today.",
]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    try:
        return args.func(args) or 0
    except (MetaEOLError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaeol", description="MetaEOL sentence embeddings from GGUF models.")
    p.add_argument("--version", action="version", version=f"metaeol-edge {__version__}")
    sub = p.add_subparsers(title="commands")

    def model_options(sp: argparse.ArgumentParser, one_model: bool = True) -> None:
        if one_model:
            sp.add_argument(
                "--model",
                "-m",
                default=None,
                help="registry id, path to a .gguf file, or a model found on this machine (ollama:NAME[:TAG], "
                "lmstudio:..., llamacpp:..., hf:OWNER/REPO/FILE.gguf, pulled on first use; see `metaeol models "
                "list`) (default: the registry's default, smollm2-135m)",
            )
        sp.add_argument(
            "--level",
            default=None,
            help="the model's quantization level: auto (default, or $METAEOL_LEVEL: the fastest that loses nothing "
            "on this CPU, e.g. q8_0 for a Q4_1 file), shipped (the file as it is), or f32, f16, bf16, q8_0, q4_k_m, "
            "..., made once from its F32 dequantization and kept in the store",
        )
        sp.add_argument(
            "--templates", "-t", default=None, help="metaeol (default), prompteol, another built-in set, or a file"
        )
        sp.add_argument(
            "--preset",
            default=None,
            help="a measured configuration (templates, layer, post-processing fit) instead of the paper's: "
            "quality (see `metaeol presets`)",
        )
        sp.add_argument(
            "--method",
            default=None,
            help="a registered method (default: eol, the paper's: last token of each template, averaged; tp: "
            "token prepending)",
        )
        sp.add_argument(
            "--tp-layers",
            default=None,
            metavar="START:STOP",
            help="with --method tp: rewrite the placeholder in blocks START..STOP-1 (the authors' tp_starting_index "
            "and tp_exiting_index; default 1:4)",
        )
        sp.add_argument("--max-length", type=int, default=512, help="tokens per prompt (default: 512)")
        sp.add_argument("--no-truncate", action="store_true", help="refuse sentences too long for max-length")
        sp.add_argument("--no-preprocess", action="store_true", help="skip the official sentence pre-processing")
        sp.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
        sp.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32")
        sp.add_argument(
            "--cache-max-mb",
            type=float,
            default=None,
            help="cap the cache's vectors at this size, evicting the least recently used "
            "(default: $METAEOL_CACHE_MAX_MB, else no cap)",
        )
        sp.add_argument(
            "--layer",
            default=None,
            help="hidden state to read: -1 = final layer after the final norm (default), k = output of block k "
            "(1..n_layer), -j counts from the end, 0.8 = that share of the depth, attn:22-30 = the attention outputs "
            "of blocks 22..30 averaged (AlignedWVA); several, comma-separated, are read in one pass (embed writes one "
            "vector per layer)",
        )
        sp.add_argument(
            "--combine-layers",
            action="store_true",
            help="with several --layer values, one vector: their mean, each layer's vector at unit length first "
            "(a layer ensemble; raw vectors)",
        )
        sp.add_argument(
            "--no-early-exit", action="store_true", help="run the whole model even when a lower layer is asked for"
        )
        sp.add_argument(
            "--postprocess", action="store_true", help="apply the per-dimension fit stored by fit-postprocess"
        )
        sp.add_argument(
            "--dim",
            type=int,
            default=None,
            metavar="K",
            help="keep the first K dimensions of whitened vectors (a preset that whitens the model's, or a whiten "
            "fit): whitening sorts them by variance; refused where the first K mean nothing",
        )
        sp.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to a Metal/CUDA GPU")
        sp.add_argument(
            "--engine-mode",
            choices=["one-at-a-time", "packed"],
            default=None,
            help="one prompt per decode, or many packed into each (for GPUs; its own cache entries) "
            "(default: one-at-a-time on the CPU, packed with --n-gpu-layers)",
        )
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
        sp.add_argument(
            "--backend",
            default=None,
            help="where prompts become hidden states: auto (default: llama.cpp, or PyTorch bf16 on a CPU with "
            "AMX tiles; $METAEOL_BACKEND), llama.cpp, naive, pytorch, or fake (hashed from the text, no model "
            "run: for tests)",
        )

    e = sub.add_parser("embed", help="embed sentences from a file")
    model_options(e)
    e.add_argument(
        "--input", "-i", required=True, help="one sentence per line (.txt), or a .jsonl, .csv or .parquet table"
    )
    e.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="input format (default: by extension: .jsonl/.ndjson, .csv, .parquet/.pq; other files text)",
    )
    e.add_argument("--text-column", default="text", help="the column (or JSONL field) to embed (default: text)")
    e.add_argument("--id-column", default=None, help="a column carried to the output in place of the text")
    e.add_argument(
        "--output",
        "-o",
        required=True,
        help="OUT.npy (float32 rows in input order), OUT.jsonl or OUT.parquet (text or id, and embedding)",
    )
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--normalize", action="store_true", help="L2-normalize each vector")
    e.add_argument("--per-template", action="store_true", help="keep each template's vector: (N, T, dim)")
    e.add_argument(
        "--workers",
        default="auto",
        help="engine processes, each with its share of --threads (default auto: one single-thread process per "
        "core for models up to 400 MB, else one process; never more than the input has shards)",
    )
    e.add_argument(
        "--ray",
        default=None,
        metavar="local|auto|ADDRESS",
        help="run --workers Ray actors: local starts Ray here, auto or ADDRESS joins a cluster (extra [ray])",
    )
    e.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"rows per checkpoint: a killed job, run again, redoes at most this per worker ({DEFAULT_SHARD_SIZE})",
    )
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    s = sub.add_parser("similarity", help="print the cosine similarity of two sentences")
    model_options(s)
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(func=cmd_similarity)

    d = sub.add_parser("demo", help="embed a few example sentences and print their similarities")
    model_options(d)
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("presets", help="list the measured configurations --preset can name")
    pr.add_argument("--json", action="store_true", help="one JSON object")
    pr.set_defaults(func=cmd_presets)

    f = sub.add_parser(
        "fit-postprocess", help="fit post-processing (standardize, whiten, ...) on unlabeled text and store it"
    )
    model_options(f)
    f.add_argument("--input", "-i", required=True, help="unlabeled sentences, one per line (not your test set)")
    f.add_argument("--format", choices=list(FORMATS), default=None, help="input format (default: by extension)")
    f.add_argument("--text-column", default="text", help="the column (or JSONL field) to read (default: text)")
    f.add_argument(
        "--kind",
        default=None,
        help="center, standardize, whiten, whiten:K (keep the top K dimensions) or abtt:K (remove the top K "
        "directions) (default: the preset's, else standardize); whitening needs more sentences than dimensions",
    )
    f.add_argument("--whiten", action="store_true", help="the same as --kind whiten")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fit_postprocess)

    ev = sub.add_parser("eval", help="score a model on SentEval's STS and transfer tasks")
    model_options(ev)
    ev.add_argument(
        "--tasks",
        default="stsb,sickr",
        help="comma-separated: sts12..sts16, stsb, sickr, mr, cr, mpqa, sst2, trec, mrpc; or the groups sts, "
        "transfer, all (default: stsb,sickr)",
    )
    ev.add_argument("--data", default=None, help="SentEval data folder (default: $METAEOL_DATA)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs (items per split) of each task")
    ev.add_argument("--save-embeddings", default=None, help="write each task's vectors and pair order here")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON on stdout")
    ev.add_argument(
        "--jobs",
        type=int,
        default=-1,
        help="processes for the transfer tasks' classifier fits (default -1: one per core; same scores)",
    )
    ev.add_argument(
        "--reference",
        action="store_true",
        help="score the full-precision PyTorch reference instead of llama.cpp (extra [reference]); --model may "
        "then also be a Hugging Face id or checkpoint folder",
    )
    ev.add_argument("--device", default=None, help="with --reference: cuda, mps or cpu (default: the first present)")
    ev.add_argument(
        "--dtype",
        default=None,
        choices=REFERENCE_DTYPES,
        help="with --reference (default: float32)",
    )
    ev.add_argument("--batch-size", type=int, default=None, help="with --reference: prompts per forward pass (16)")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench", help="measure speed and STS-B accuracy of quantization levels on this machine, and advise"
    )
    model_options(b)
    b.add_argument("--levels", default="shipped,f16,q8_0,q4_k_m", help="comma-separated levels to measure")
    b.add_argument("--pairs", type=int, default=300, help="STS-B test pairs scored per level")
    b.add_argument("--n", type=int, default=48, help="sentences timed per level (embedding cache off)")
    b.add_argument("--data", default=None, help="SentEval data folder (default: $METAEOL_DATA)")
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI and Ollama APIs); extra [server]")
    model_options(sv, one_model=False)
    sv.set_defaults(model=None)
    sv.add_argument(
        "--model",
        "-m",
        action="append",
        dest="models",
        default=None,
        help="a model to serve, as ID_OR_PATH or NAME=ID_OR_PATH; repeat for several (default: smollm2-135m)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $METAEOL_API_KEY)")
    sv.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the key from this file (one line), so that it does not show in ps",
    )
    sv.add_argument("--normalize", action="store_true", help="L2-normalize every vector served")
    sv.add_argument("--batch-size", type=int, default=64, help="sentences per engine batch, across requests (64)")
    sv.add_argument("--max-body-bytes", type=int, default=4_000_000, help="largest request body (4 MB)")
    sv.add_argument("--max-inputs", type=int, default=2048, help="most inputs in one request (2048)")
    sv.add_argument("--max-chars", type=int, default=20_000, help="longest input in characters (20000)")
    sv.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (120)")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting per model before a 503 (256)")
    sv.add_argument(
        "--collection", action="append", dest="collections", default=None,
        help="serve POST /v1/search over this collection (from `metaeol index`); repeatable",
    )  # fmt: skip
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list, pull, locate or remove models")
    msub = m.add_subparsers(title="models commands")
    ml = msub.add_parser(
        "list", help="known models and whether they are pulled, then the GGUF models found on this machine"
    )
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=cmd_models_list)
    mp = msub.add_parser("pull", help="download a model into the store")
    mp.add_argument("id", help="registry id, or hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT (e.g. :Q4_K_M)")
    mp.add_argument("--force", action="store_true", help="download again even if present")
    mp.set_defaults(func=cmd_models_pull)
    mpa = msub.add_parser("path", help="print a pulled model's file path")
    mpa.add_argument("id")
    mpa.set_defaults(func=cmd_models_path)
    mq = msub.add_parser("quantize", help="write other quantization levels of a model into the store")
    mq.add_argument("id", help="registry id or .gguf path")
    mq.add_argument("--to", required=True, help="comma-separated levels, e.g. f32,f16,q8_0,q4_k_m")
    mq.set_defaults(func=cmd_models_quantize)
    mv = msub.add_parser("verify", help="check pulled models against the registry's SHA-256")
    mv.add_argument("id", nargs="?", default=None, help="one model (default: every pulled one)")
    mv.set_defaults(func=cmd_models_verify)
    mr = msub.add_parser("rm", help="remove a pulled model (a registry id or hf:OWNER/REPO/FILE.gguf)")
    mr.add_argument("id")
    mr.set_defaults(func=cmd_models_rm)
    m.set_defaults(func=cmd_models_list, json=False)

    c = sub.add_parser("cache", help="inspect or clear the embedding cache")
    csub = c.add_subparsers(title="cache commands")
    cs = csub.add_parser("stats", help="entries per model and template, size, hit rate")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_cache_stats)
    cc = csub.add_parser("clear", help="delete entries (all, or of one model and/or template)")
    cc.add_argument(
        "--model", help="a model's label exactly as `cache stats` shows it, or 8+ hex digits of its fingerprint"
    )
    cc.add_argument("--template", help="task name (e.g. sentiment) or exact template text")
    cc.set_defaults(func=cmd_cache_clear)
    cp = csub.add_parser("path", help="print the cache file's path")
    cp.set_defaults(func=cmd_cache_path)
    cm = csub.add_parser(
        "merge", help="add the entries of other caches (other machines', say) to this one: all or nothing"
    )
    cm.add_argument("sources", nargs="+", help="cache files to read (left unchanged)")
    cm.add_argument("--into", default=None, help="the cache to add to (default: this machine's, see cache path)")
    cm.set_defaults(func=cmd_cache_merge)
    c.set_defaults(func=cmd_cache_stats, json=False)

    # Search by meaning over your own files (issue 31): the logic is in metaeol_edge.faces.search.
    ix = sub.add_parser("index", help="index folders or tables into a collection searchable by meaning")
    model_options(ix)
    ix.add_argument("name", help="the collection: a name (kept under the user data dir) or a .sqlite3 path")
    ix.add_argument("paths", nargs="*", help="folders or files (default: those indexed into it before)")
    ix.add_argument("--include", action="append", default=None, help="glob of files to read (repeatable)")
    ix.add_argument("--exclude", action="append", default=None, help="glob of files or folders to leave out")
    ix.add_argument("--text-column", default="text", help=".jsonl/.csv/.parquet: the column to index (text)")
    ix.add_argument("--id-column", default=None, help=".jsonl/.csv/.parquet: a column kept with each row")
    ix.add_argument("--overlap", type=int, default=None, help="tokens repeated between chunks (new collections; 0)")
    ix.add_argument("--batch-size", type=int, default=32)
    ix.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ix.set_defaults(func=cmd_index)
    se = sub.add_parser("search", help="the chunks of a collection nearest a query")
    model_options(se)
    se.add_argument("name", help="the collection (name or .sqlite3 path)")
    se.add_argument("query")
    se.add_argument("-k", type=int, default=10, help="results (10)")
    se.add_argument("--json", action="store_true", help="one JSON object, as POST /v1/search answers")
    se.set_defaults(func=cmd_search)
    si = sub.add_parser("similar", help="the chunks of a collection nearest one of its chunks")
    si.add_argument("name", help="the collection (name or .sqlite3 path)")
    si.add_argument("--to", required=True, metavar="PATH[:LINE]", help="a file in the collection, and a line in it")
    si.add_argument("-k", type=int, default=10, help="results (10)")
    si.add_argument("--json", action="store_true", help="one JSON object, as POST /v1/search answers")
    si.set_defaults(func=cmd_similar)
    co = sub.add_parser("collections", help="list, show or remove search collections")
    cosub = co.add_subparsers(title="collections commands")
    col = cosub.add_parser("list", help="every collection, with its chunks, files and model")
    col.add_argument("--json", action="store_true")
    col.set_defaults(func=cmd_collections_list)
    cos = cosub.add_parser("show", help="a collection's configuration, folders and counts (JSON)")
    cos.add_argument("name")
    cos.set_defaults(func=cmd_collections_show)
    cor = cosub.add_parser("rm", help="delete a collection")
    cor.add_argument("name")
    cor.set_defaults(func=cmd_collections_rm)
    co.set_defaults(func=cmd_collections_list, json=False)
    return p


def _model(args: argparse.Namespace, **overrides):
    from metaeol_edge.core.embedder import MetaEOL

    config = _config(args)
    return MetaEOL.from_config(config.replace(**overrides) if overrides else config)


def _method(args: argparse.Namespace):
    """``--method``, or Token Prepending over ``--templates`` with ``--tp-layers``."""
    if args.tp_layers is None:
        return args.method
    if args.method != "tp":
        raise InputError("--tp-layers needs --method tp")
    if getattr(args, "preset", None):
        raise InputError("--tp-layers does not combine with --preset (a preset fixes its templates and fit)")
    from metaeol_edge.methods import TokenPrepending
    from metaeol_edge.methods.prompts import load_templates

    try:
        start, stop = (int(x) for x in args.tp_layers.split(":"))
    except ValueError:
        raise InputError(f"--tp-layers must be START:STOP, two block numbers, not {args.tp_layers!r}") from None
    return TokenPrepending(load_templates(args.templates or "metaeol"), start, stop)


def _config(args: argparse.Namespace) -> EmbedConfig:
    """The one configuration the model options describe (what every command hands down)."""
    if args.cache_max_mb is not None and not args.cache_max_mb > 0:
        raise InputError(f"--cache-max-mb must be a positive size in MB, not {args.cache_max_mb:g}")
    return EmbedConfig.of(
        model=args.model,
        templates=args.templates,
        preset=args.preset,
        method=_method(args),
        backend=getattr(args, "backend", None),
        level=args.level,
        n_gpu_layers=args.n_gpu_layers,
        engine_mode=args.engine_mode,
        n_threads=args.threads,
        max_length=args.max_length,
        preprocess=not args.no_preprocess,
        truncate=not args.no_truncate,
        cache=not args.no_cache,
        cache_dtype=args.cache_dtype,
        cache_max_bytes=int(args.cache_max_mb * 1e6) if args.cache_max_mb else None,
        layer=[x.strip() for x in args.layer.split(",")] if args.layer and "," in args.layer else args.layer,
        combine_layers=getattr(args, "combine_layers", False),
        early_exit=not args.no_early_exit,
        postprocess=args.postprocess or None,
        truncate_dim=getattr(args, "dim", None),
    )


def _reference(args: argparse.Namespace):
    """The PyTorch reference for ``eval --reference``: a registry id becomes its GGUF file."""
    from metaeol_edge.core.recipes import Reference

    for flag, given in (("--postprocess", args.postprocess), ("--preset", args.preset)):
        if given:
            raise InputError(f"{flag} applies to the llama.cpp engine only, not to --reference")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    label = args.model or registry.default_model_id()
    is_id = resolve.is_model_name(label)  # a registry id, ollama:..., hf:...: its GGUF file
    model: str | Path = label
    if args.level and args.level.lower() != "shipped":
        if not (is_id or label.endswith(".gguf")):
            raise InputError("--level needs a registry id or a .gguf file, not a Hugging Face id or folder")
        model = resolve.quantized(label, args.level.lower())
    elif is_id:
        model = resolve.resolve_model(label)
    # Anything else (a .gguf path, a folder, a Hugging Face id) goes to transformers as given.
    return Reference(
        model,
        args.templates or "metaeol",
        method=_method(args),
        dtype=args.dtype or "float32",
        device=args.device,
        preprocess=not args.no_preprocess,
        layer=args.layer or "-1",
        label=label,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    from metaeol_edge.faces.bulk import EncodeOptions, embed_file

    if args.workers != "auto" and not (args.workers.isdigit() and int(args.workers) > 0):
        raise InputError(f"--workers takes a positive number or auto, not {args.workers!r}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, not {args.threads}")
    report = embed_file(
        args.input,
        args.output,
        _config(args).replace(n_threads=None),  # the job splits --threads among its workers
        fmt=args.format,
        text_column=args.text_column,
        id_column=args.id_column,
        encode=EncodeOptions(args.batch_size, args.normalize, args.per_template),
        workers=args.workers if args.workers == "auto" else int(args.workers),
        threads=args.threads,
        ray=args.ray,
        shard_size=args.shard_size,
        show_progress=not args.quiet,
    )
    hits, misses = report.hits, report.misses
    cached = f", {hits} cached and {misses} computed prompt vectors" if hits or misses else ""
    resumed = f", {report.resumed_rows} rows from an earlier run" if report.resumed_rows else ""
    print(f"wrote {report.rows} embeddings {report.shape} to {report.output}{cached}{resumed}", file=sys.stderr)
    return 0


def _read_key(path: str) -> str:
    """An API key file's one line (its line end dropped; anything more is refused, not guessed at)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4097)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"cannot read --api-key-file {path}: {reason}") from exc
    key = text.removesuffix("\n").removesuffix("\r")
    if len(text) > 4096 or "\n" in key:
        raise InputError(f"--api-key-file {path} must hold one line, the key")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from metaeol_edge.faces import server

    limits = server.Limits(
        max_body_bytes=args.max_body_bytes,
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        timeout_s=args.timeout,
        max_queue=args.max_queue,
        batch_size=args.batch_size,
    )
    for name in ("max_body_bytes", "max_inputs", "max_chars", "timeout_s", "max_queue", "batch_size"):
        if not getattr(limits, name) > 0:
            raise InputError(f"--{name.removesuffix('_s').replace('_', '-')} must be positive")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, not {args.port}")
    if args.layer and "," in args.layer and not args.combine_layers:
        raise InputError("the server gives one vector per input: several --layer values need --combine-layers")
    # Checked before any model loads: an empty key used to turn authentication off without a word.
    if args.api_key is not None and args.api_key_file is not None:
        raise InputError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        api_key: str | None = server.check_api_key(_read_key(args.api_key_file), f"--api-key-file {args.api_key_file}")
    elif args.api_key is not None:
        api_key = server.check_api_key(args.api_key, "--api-key")
    elif "METAEOL_API_KEY" in os.environ:
        api_key = server.check_api_key(os.environ["METAEOL_API_KEY"], "METAEOL_API_KEY")
    else:
        api_key = None
    if not server.is_loopback(args.host) and not api_key:
        print(
            f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use it "
            "(give --api-key or set METAEOL_API_KEY)",
            file=sys.stderr,
        )
    specs = [server.served_name(spec) for spec in args.models or [registry.default_model_id()]]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise InputError(f"two served models have the same name: {', '.join(names)}; use NAME=MODEL")
    workers: dict[str, server.ModelWorker] = {}
    collections = {}
    try:
        for name in args.collections or []:
            collections[name] = _collection(args, name, served=True)
            collections[name].model.backend  # noqa: B018 - load now, as the models are
            print(f"opened collection {name}: {collections[name].stats()['chunks']} chunks", file=sys.stderr)
        for name, model_spec in specs:
            model = _model(args, model=model_spec)
            model.backend  # noqa: B018 - load now: /health answers once every model is ready
            workers[name] = server.ModelWorker(name, model, limits, normalize=args.normalize)
            print(
                f"loaded {name}: {model.model_path} ({model.level}, {model.dim} dimensions, {model.templates.name})",
                file=sys.stderr,
            )
        server.serve(
            workers,
            args.host,
            args.port,
            limits,
            api_key,
            on_ready=lambda url: print(f"serving {', '.join(workers)} on {url}", file=sys.stderr, flush=True),
            collections=collections,
        )
    finally:
        for worker in workers.values():
            worker.model.close()  # commits and closes the cache
        for collection in collections.values():
            collection.close()
    print("stopped", file=sys.stderr)
    return 0


def _collection(args: argparse.Namespace, name: str, create: bool = False, served: bool = False):
    """A collection opened with the model options given (each must agree with the collection's)."""
    from metaeol_edge.faces.search import Collection

    options = {} if served else _config(args).kwargs()  # serve's --model options are its models'
    runtime = {"cache": not args.no_cache, "n_threads": args.threads, "truncate": not args.no_truncate}
    for key in (*runtime, "cache_max_bytes"):
        options.pop(key, None)
    return Collection.open(name, create=create, overlap=getattr(args, "overlap", None), **runtime, **options)


def cmd_index(args: argparse.Namespace) -> int:
    import os

    if not args.paths and (args.include or args.exclude or args.text_column != "text" or args.id_column):
        raise InputError("--include, --exclude, --text-column and --id-column apply to the PATHs given")
    for path in args.paths:
        if not os.path.lexists(os.path.expanduser(path)):
            raise InputError(f"no such file or folder: {path}")
    with _collection(args, args.name, create=True) as collection:
        report = collection.index(
            args.paths or None,
            include=args.include or (),
            exclude=args.exclude or (),
            text_column=args.text_column,
            id_column=args.id_column,
            batch_size=args.batch_size,
            show_progress_bar=False if args.quiet else None,
        )
    for skipped in report.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    print(
        f"{args.name}: files {report.added} added, {report.changed} changed, {report.unchanged} unchanged, "
        f"{report.removed} removed, {len(report.skipped)} skipped; chunks {report.chunks_embedded} embedded, "
        f"{report.chunks_reused} reused, {report.chunks_removed} removed ({report.seconds:.1f} s)"
    )
    return 0


def _print_hits(args: argparse.Namespace, collection, hits) -> None:
    if args.json:
        body = {"object": "list", "collection": collection.name, "model": collection.stats()["model"],
                "data": [h.to_dict() for h in hits]}  # fmt: skip
        print(json.dumps(body, ensure_ascii=False, indent=1))
        return
    for h in hits:
        text = " ".join(h.text.split())
        print(f"{h.rank:>3}  {h.score:.4f}  {h.where}\n     {text[:300]}{'…' if len(text) > 300 else ''}")


def cmd_search(args: argparse.Namespace) -> int:
    with _collection(args, args.name) as collection:
        _print_hits(args, collection, collection.search(args.query, k=args.k))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from metaeol_edge.faces.search import Collection

    path, sep, line = args.to.rpartition(":")
    if not (sep and line.isdigit()):
        path, line = args.to, ""
    with Collection.open(args.name, create=False) as collection:
        _print_hits(args, collection, collection.similar(path, int(line) if line else None, k=args.k))
    return 0


def cmd_collections_list(args: argparse.Namespace) -> int:
    from metaeol_edge.faces.search import list_collections
    from metaeol_edge.faces.search.collection import collections_dir

    rows = list_collections()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no collections in {collections_dir()}: make one with `metaeol index NAME PATH...`", file=sys.stderr)
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} unreadable: {r['error']}")
        else:
            print(f"{r['name']:<24}{r['chunks']:>9} chunks{r['files']:>7} files  {r['model']}")
    return 0


def cmd_collections_show(args: argparse.Namespace) -> int:
    from metaeol_edge.faces.search import Collection

    with Collection.open(args.name, create=False) as collection:
        print(json.dumps(collection.stats(), indent=2))
    return 0


def cmd_collections_rm(args: argparse.Namespace) -> int:
    from metaeol_edge.faces.search import remove_collection

    print(f"removed {remove_collection(args.name)}")
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    with _model(args) as model:
        print(f"{model.similarity(args.a, args.b):.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with _model(args) as model:
        print(
            f"model: {model.model_label} ({model.model_path}), {len(model.templates)} templates "
            f"({model.templates.name}), dim {model.dim}"
        )
        vectors = model.encode(EXAMPLES, show_progress_bar=True)
    for s, v in zip(EXAMPLES, vectors, strict=True):
        head = " ".join(f"{x:+.3f}" for x in v[:6])
        print(f"[{head} ...]  {s}")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    print("\ncosine similarity")
    for i, s in enumerate(EXAMPLES):
        print(" ".join(f"{sims[i, j]:6.3f}" for j in range(len(EXAMPLES))), f" {s[:48]}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    specs, default = registry.load_registry()
    rows = []
    for spec in specs.values():
        pulled = registry.is_pulled(spec.id)
        rows.append(
            {
                "id": spec.id,
                "default": spec.id == default,
                "architecture": spec.architecture,
                "quantization": spec.quantization,
                "size": spec.size,
                "pulled": pulled,
                "path": str(registry.model_path(spec.id)) if pulled else None,
                "license": spec.license,
                "source": "registry",
            }
        )
    found_rows = _found_rows(specs)
    if args.json:
        print(json.dumps(rows + found_rows, indent=2))
        return 0
    print(f"{'id':<22}{'arch':<9}{'quant':<9}{'size':>9}  {'pulled':<7} license")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(
            f"{r['id'] + mark:<22}{r['architecture']:<9}{r['quantization']:<9}{r['size'] / 1e6:>7.0f}MB  "
            f"{'yes' if r['pulled'] else 'no':<7} {r['license']}"
        )
    print(f"\n* default model. Store: {store.store_dir()}")
    from metaeol_edge.evaluation import measurements

    measured = measurements.load(store.store_dir())
    for r in rows:
        line = measurements.advice(measured, r["id"])
        if line:
            print(f"advice: {line}")
    if not measured:
        print("(run `metaeol bench --model ID --levels shipped,f16,q8_0` to see which level is fastest here)")
    _print_found(found_rows)
    return 0


def _found_rows(specs: dict[str, registry.ModelSpec]) -> list[dict]:
    """The GGUF models found on this machine, each with its SHA-256 (hashed once, then remembered)."""
    from metaeol_edge.models import found

    registry_ids = {spec.sha256: spec.id for spec in specs.values()}
    rows = []
    for m in found.find_models():
        if m.usable and not m.sha256 and not found.known_sha256(m.name, m.path):
            print(f"computing the SHA-256 of {m.name} ({m.size / 1e9:.2f} GB), once", file=sys.stderr)
        try:
            sha = found.model_sha256(m) if m.usable else m.sha256
        except OSError:
            sha = None
        rows.append(
            {
                "id": m.name,
                "source": m.source,
                "architecture": m.architecture,
                "quantization": m.quantization,
                "size": m.size,
                "n_layer": m.n_layer,
                "n_embd": m.n_embd,
                "usable": m.usable,
                "reason": m.reason or None,
                "path": str(m.path),
                "parts": len(m.parts),
                "sha256": sha,
                "same_as": registry_ids.get(sha or ""),  # the same file: the same cached vectors
            }
        )
    return rows


def _print_found(rows: list[dict]) -> None:
    from metaeol_edge.models import found

    if not rows:
        where = ", ".join(str(p) for paths in found.locations().values() for p in paths)
        print(f"\nno GGUF models found on this machine (looked in {where})")
        return
    width = max(len(r["id"]) for r in rows) + 2
    print("\nfound on this machine (use the name as --model):")
    print(f"{'name':<{width}}{'source':<10}{'arch':<11}{'quant':<9}{'size':>9}{'layers':>7}{'dim':>6}")
    for r in rows:
        note = f"same file as {r['same_as']}" if r["same_as"] else ""
        if not r["usable"]:
            note = f"not usable: {r['reason']}"
        elif r["parts"] > 1:
            note = f"{r['parts']} parts" + (f", {note}" if note else "")
        print(
            f"{r['id']:<{width}}{r['source']:<10}{r['architecture'] or '?':<11}{r['quantization'] or '?':<9}"
            f"{r['size'] / 1e6:>7.0f}MB{r['n_layer'] or '':>7}{r['n_embd'] or '':>6}  {note}"
        )


def cmd_models_pull(args: argparse.Namespace) -> int:
    from metaeol_edge.core.embedder import pull_progress
    from metaeol_edge.models import found, hub

    if args.id.startswith("hf:"):
        path = hub.pull_model(args.id, progress=pull_progress(), force=args.force)
    elif found.is_found_name(args.id):  # Ollama's, LM Studio's: used where they lie, nothing to download
        path = found.resolve(args.id)
        print(f"{args.id} is used in place, not copied", file=sys.stderr)
    else:
        path = registry.pull_model(args.id, progress=pull_progress(), force=args.force)
    print(path)
    return 0


def cmd_models_path(args: argparse.Namespace) -> int:
    print(resolve.resolve_model(args.id, pull=False))
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    specs, _ = registry.load_registry()
    ids = [args.id] if args.id else [i for i in specs if registry.is_pulled(i)]
    if args.id:
        registry.get_spec(args.id, paths_allowed=False)
    if not ids:
        print("no model is pulled", file=sys.stderr)
        return 0
    bad = []
    for model_id in ids:
        ok = registry.verify_model(model_id, force=True)
        print(f"{model_id}\t{'ok' if ok else 'DAMAGED'}\t{registry.model_path(model_id)}")
        if not ok:
            bad.append(model_id)
    for model_id in bad:
        print(
            f"error: {model_id} does not match its SHA-256; run: metaeol models pull {model_id} --force",
            file=sys.stderr,
        )
    return 1 if bad else 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    from metaeol_edge.models import found, hub

    if args.id.startswith("hf:"):
        if hub.remove(args.id):
            print(f"removed {args.id}")
            return 0
        print(f"{args.id} is not pulled into the store (files in the Hugging Face cache stay)", file=sys.stderr)
        return 1
    if found.is_found_name(args.id):
        raise InputError(f"{args.id} belongs to {args.id.split(':', 1)[0]}, not to metaeol: remove it there")
    if resolve.looks_like_path(args.id):
        raise InputError(
            f"metaeol models rm takes a registry id, not a path ({args.id}): it removes pulled models only; "
            "a file you gave by path is yours to delete"
        )
    registry.get_spec(args.id, paths_allowed=False)
    if registry.remove_model(args.id):
        print(f"removed {args.id}")
        return 0
    print(f"{args.id} is not pulled", file=sys.stderr)
    return 1


def _open_cache() -> EmbeddingCache:
    cache = EmbeddingCache.open()
    if cache is None:
        raise InputError(f"the embedding cache at {default_path()} cannot be opened")
    return cache


def cmd_cache_stats(args: argparse.Namespace) -> int:
    cache = _open_cache()
    stats = cache.stats()
    cache.close()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"cache: {stats['path']}")
    per = f" ({stats['bytes_per_entry']:.0f} bytes per entry)" if stats["entries"] else ""
    print(f"entries: {stats['entries']}, on disk: {stats['bytes_on_disk'] / 1e6:.2f} MB{per}")
    for g in stats["groups"]:
        print(f"  {g['model']:<24} {g['task']:<18} {g['entries']:>8}  {g['template']}...")
    if stats["runs"]:
        print(f"hit rate over the last {len(stats['runs'])} runs: {100 * stats['hit_rate']:.1f}%")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    cache = _open_cache()
    try:
        # Say what will go, per model, before it goes: a model is matched exactly (label or fingerprint prefix).
        for group in cache.clear_plan(model=args.model, template=args.template):
            print(f"deleting {group['entries']} entries of {group['model']} (fingerprint {group['fingerprint']})")
        n = cache.clear(model=args.model, template=args.template)
    finally:
        cache.close()
    print(f"deleted {n} entries")
    return 0


def cmd_cache_path(args: argparse.Namespace) -> int:
    print(default_path())
    return 0


def cmd_cache_merge(args: argparse.Namespace) -> int:
    from metaeol_edge.core.cache import CacheError, CacheTooNewError, merge_caches

    target = Path(args.into) if args.into else default_path()
    try:
        results = merge_caches(target, args.sources)
    except (CacheError, CacheTooNewError) as exc:
        raise InputError(str(exc)) from exc
    for r in results:
        damaged = f", {r['damaged']} damaged skipped" if r["damaged"] else ""
        print(f"{r['source']}: {r['added']} added, {r['present']} already present{damaged}")
    print(f"merged into {target}")
    return 0


def cmd_fit_postprocess(args: argparse.Namespace) -> int:
    if args.dim is not None:
        raise InputError("--dim cuts the vectors a whitening fit makes; fit first, then embed with --postprocess --dim")
    sentences = read_sentences(args.input, args.format, args.text_column)
    args.postprocess = False
    with _model(args) as model:
        if args.whiten and args.kind not in (None, "whiten"):
            raise InputError(f"--whiten and --kind {args.kind} disagree: give one")
        paths = model.fit_postprocess(
            sentences,
            kind="whiten" if args.whiten else args.kind,
            batch_size=args.batch_size,
            show_progress_bar=not args.quiet,
        )
    for path in paths:
        print(path)
    print(f"fitted on {len(sentences)} sentences; use it with --postprocess", file=sys.stderr)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from metaeol_edge.core.presets import load_presets

    presets = load_presets()
    if args.json:
        print(json.dumps({name: asdict(p) for name, p in presets.items()}, indent=2))
        return 0
    for p in presets.values():
        print(f"{p.name}: templates {p.templates}, {_read(p)}, post-processing {p.postprocess}")
        print(f"  {p.description}")
        for model, fit in p.fits.items():
            print(f"  ships a fit for {model} (made on {fit.fit_on})")
        for model, choice in p.models.items():
            own = p.for_model(choice.sha256)
            print(
                f"  for {model}: templates {own.templates}, {_read(own)}, post-processing "
                f"{own.postprocess or 'none'} ({choice.chosen})"
            )
        if p.earlier:
            print(f"  revision {p.revision}; earlier ones, still named by --preset: "
                  + ", ".join(f"{e.pinned} (templates {e.templates})" for e in p.earlier.values()))  # fmt: skip
    return 0


def _read(preset) -> str:
    """What a preset reads, as ``metaeol presets`` says it: ``layer 1.0``, or ``layers 29+24 averaged``."""
    if preset.combine_layers:
        spans = any(str(x).startswith(ATTENTION) for x in preset.layer)
        why = "; attn:A-B is the attention outputs of blocks A..B, averaged" if spans else ""
        return "layers " + "+".join(str(x) for x in preset.layer) + f" averaged (each at unit length{why})"
    return f"layer {preset.layer}"


def _levels(text: str, shipped: bool = False) -> list[str]:
    """Parse a comma-separated list of quantization levels; unknown ones are an error naming the known."""
    from metaeol_edge.models.quantization import QUANT_LEVELS

    known = (["shipped"] if shipped else []) + list(QUANT_LEVELS)
    levels = [x.strip().lower() for x in text.split(",") if x.strip()]
    unknown = [x for x in levels if x not in known]
    if not levels or unknown:
        raise InputError(f"unknown level(s) {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    return levels


def cmd_models_quantize(args: argparse.Namespace) -> int:
    for level in _levels(args.to):
        path = resolve.quantized(args.id, level)
        print(f"{level}\t{path.stat().st_size / 1e6:.0f} MB\t{path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from metaeol_edge.evaluation import data_dir, evaluate, task_names

    tasks = task_names(args.tasks)
    if args.jobs == 0 or args.jobs < -1:
        raise InputError("--jobs takes a number of processes, or -1 for one per core")
    if args.limit is not None and args.limit < 2:
        raise InputError("--limit must be at least 2")
    if not args.reference:
        given = [f"--{k.replace('_', '-')}" for k in ("device", "dtype", "batch_size") if getattr(args, k) is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --reference")
    root = data_dir(args.data)

    def show(name: str, r: dict) -> None:
        if not args.json:
            rate = r["sentences"] / r["seconds"] if r["seconds"] else float("inf")
            size = f"{r['pairs']} pairs" if "pairs" in r else f"{r['sentences']} sentences"
            print(f"{name:<8}{r['score']:7.2f}   ({size}, {rate:.2f} sent/s)", flush=True)

    with _reference(args) if args.reference else _model(args) as model:

        def encode(sentences: list[str]) -> np.ndarray:
            if args.reference:
                return model.encode(sentences, batch_size=args.batch_size or 16, show_progress_bar=not args.quiet)
            return model.encode(sentences, show_progress_bar=not args.quiet)

        about = {
            "model": args.model or registry.default_model_id(),
            "level": (args.level or "shipped").lower() if args.reference else model.level,
            "model_file": model.model_path.name,
            "backend": (
                f"pytorch {model.device} {args.dtype or 'float32'}" if args.reference else model.resolved_config.backend
            ),
            "templates": model.templates.name,
            "method": model.method.name,
            "layer": model.read,
        }
        report = evaluate(
            encode,
            tasks,
            root,
            limit=args.limit,
            save_dir=Path(args.save_embeddings) if args.save_embeddings else None,
            n_jobs=args.jobs,
            about=about,
            on_task=show,
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for label, key in (("STS avg", "sts_average"), ("transfer avg", "transfer_average")):
            if report[key] is not None:
                print(f"{label:<14}{report[key]:7.2f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from metaeol_edge.evaluation import data_dir, load_sts, measurements

    levels = _levels(args.levels, shipped=True)
    model_id = args.model or registry.default_model_id()
    args.model = model_id
    data = load_sts("stsb", data_dir(args.data), "test", args.pairs)

    def open_model(level: str, cache: bool):
        args.level = level
        return _model(args, cache=cache)

    def show(m: measurements.Measurement) -> None:
        print(f"{m.level:<9}{m.size_bytes / 1e6:>7.0f}{m.sentences_per_s:>9.2f}{m.stsb:>8.2f}", flush=True)

    print(f"{'level':<9}{'MB':>7}{'sent/s':>9}{'STS-B':>8}   ({args.pairs} STS-B test pairs, {args.n} sentences timed)")
    rows = measurements.bench(open_model, model_id, args.templates or "metaeol", levels, data, args.n, on_row=show)
    measurements.record(store.store_dir(), rows)
    stored = measurements.load(store.store_dir())
    fastest = max(rows, key=lambda m: m.sentences_per_s)
    print(f"fastest here: {fastest.level} ({fastest.sentences_per_s:.2f} sentences/s)")
    line = measurements.advice(stored, model_id)
    print(f"advice: {line}" if line else "advice: the shipped level is the best trade measured here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
