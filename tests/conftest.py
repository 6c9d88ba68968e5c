"""Shared fixtures. Real models come through the registry (pulled once, kept in the
user's model store between runs); every test gets its own empty embedding cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaeol_edge import registry

REPO = Path(__file__).resolve().parents[1]


def senteval_dir() -> Path:
    return Path(os.environ.get("METAEOL_DATA", REPO.parent / "shared" / "senteval"))


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


@pytest.fixture(scope="session")
def sts_sentences() -> list[str]:
    """Raw STS-B test sentences, with a question and quotes mixed in."""
    path = senteval_dir() / "STS" / "STSBenchmark" / "sts-test.csv"
    assert path.is_file(), f"SentEval data not found at {path}; set METAEOL_DATA"
    sentences = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            sentences.append(cols[5])
    return sentences
