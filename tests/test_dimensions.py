"""Shorter vectors from whitened configurations (issue 33, lever 7): ``truncate_dim`` in Python, ``--dim`` in the
shell, ``dimensions`` in the server's OpenAI and Ollama APIs. Whitening sorts coordinates by variance, so its first
K are a shorter embedding of the same space; anywhere else the first K mean nothing, and a cut is refused."""

import json

import numpy as np
import pytest
from conftest import FAKE, fake
from metaeol_edge.cli import main

from metaeol_edge import postprocess as pp

KEEP = 64  # the fit's width: whiten:64


@pytest.fixture
def home(fake_model, sts_sentences, tmp_path, monkeypatch):
    """A store with a whiten:64 fit for the fake model's PromptEOL vectors (fitted on 200 sentences)."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))
    with fake(fake_model, "prompteol") as model:
        model.fit_postprocess(sts_sentences[:200], kind=f"whiten:{KEEP}")
    return tmp_path / "home"


def test_truncate_dim_keeps_the_first_whitened_coordinates(home, fake_model, sts_sentences):
    sentences = sts_sentences[300:310]
    with fake(fake_model, "prompteol", postprocess=True) as full:
        assert full.dim == full.full_dim == KEEP
        whole = full.encode(sentences)
        assert np.array_equal(full.encode(sentences, truncate_dim=8), whole[:, :8])  # for one call
        assert np.array_equal(full.encode(sentences, truncate_dim=KEEP), whole)  # the whole width: no cut
    with fake(fake_model, "prompteol", postprocess=True, truncate_dim=16) as short:
        assert short.dim == short.get_sentence_embedding_dimension() == 16 and short.full_dim == KEEP
        got = short.encode(sentences)
        assert got.shape == (10, 16) and np.array_equal(got, whole[:, :16])
        # Another batch shape rounds the fit's matrix product in other places (any whitened vector does).
        assert np.allclose(short.encode(sentences[0]), whole[0, :16], atol=1e-5)
        assert np.allclose(np.stack(list(short.encode_iter(iter(sentences), batch_size=3))), got, atol=1e-5)
        # Normalized after the cut: unit vectors of the first 16 coordinates.
        unit = short.encode(sentences, normalize_embeddings=True)
        assert np.allclose(unit, got / np.linalg.norm(got, axis=1, keepdims=True), atol=1e-6)
        assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
        with pytest.raises(ValueError, match="per_template vectors are raw"):
            short.encode(sentences, per_template=True)


def test_a_cut_where_the_first_coordinates_mean_nothing_is_refused(home, fake_model, sts_sentences, tmp_path):
    with pytest.raises(ValueError, match=r"truncate_dim 16 needs whitened vectors, and these are raw"):
        fake(fake_model, "prompteol", truncate_dim=16)
    with fake(fake_model, "prompteol", cache=False) as raw:
        assert raw.encode(sts_sentences[:2], truncate_dim=576).shape == (2, 576)  # the whole width is no cut
        with pytest.raises(ValueError, match="a preset that whitens this model"):
            raw.encode(sts_sentences[:2], truncate_dim=100)
    for bad, message in [(0, "positive integer"), (True, "positive integer"), (2.5, "positive integer"),
                         ("16", "positive integer"), (KEEP + 1, f"over the vectors' width of {KEEP}")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            fake(fake_model, "prompteol", postprocess=True, truncate_dim=bad)
    # A standardized configuration keeps the model's own coordinate order: its first K are any K.
    with fake(fake_model, "metaeol") as model:
        model.fit_postprocess(sts_sentences[:40], kind="standardize")
    with pytest.raises(ValueError, match="these are standardize-post-processed"):
        fake(fake_model, "metaeol", postprocess=True, truncate_dim=32)


def test_check_prefix_reads_every_layers_fit():
    assert pp.check_prefix(8, 64, ["whiten:64", "whiten:64"]) == 8
    with pytest.raises(ValueError, match="abtt:4-post-processed"):
        pp.check_prefix(8, 64, ["whiten:64", "abtt:4"])
    assert pp.check_prefix(64, 64, None) == 64
    vectors = np.arange(12, dtype=np.float32).reshape(2, 6) + 1
    short = pp.shorten(vectors, 3, normalize=True)
    want = vectors[:, :3] / np.linalg.norm(vectors[:, :3], axis=1, keepdims=True)
    assert short.flags.c_contiguous and np.allclose(short, want)
    assert pp.shorten(vectors, 6) is vectors


def test_dim_in_the_shell(home, fake_model, sts_sentences, tmp_path, capsys):
    src = tmp_path / "s.txt"
    src.write_text("\n".join(sts_sentences[300:304]) + "\n", encoding="utf-8")
    base = ["embed", *FAKE, "--model", str(fake_model), "-t", "prompteol", "-i", str(src), "-q"]
    assert main([*base, "--postprocess", "--dim", "16", "-o", str(tmp_path / "a.npy")]) == 0
    assert main([*base, "--postprocess", "-o", str(tmp_path / "b.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")[:, :16])
    capsys.readouterr()
    assert main([*base, "--dim", "16", "-o", str(tmp_path / "c.npy")]) == 2
    err = capsys.readouterr().err
    assert "needs whitened vectors" in err and "Traceback" not in err and not (tmp_path / "c.npy").exists()


def test_dimensions_in_the_openai_and_ollama_apis(home, fake_model, sts_sentences):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from metaeol_edge.server import Limits, ModelWorker
    from test_server import _Running

    sentences = sts_sentences[300:303]
    with fake(fake_model, "prompteol", postprocess=True, cache=False) as model:
        whole = model.encode(sentences)
    limits = Limits()
    running = _Running(
        {
            "white": ModelWorker("white", fake(fake_model, "prompteol", postprocess=True, cache=False), limits),
            "unit": ModelWorker(
                "unit", fake(fake_model, "prompteol", postprocess=True, cache=False), limits, normalize=True
            ),
            "raw": ModelWorker("raw", fake(fake_model, "prompteol", cache=False), limits),
        },
        limits,
    )
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            r = c.post("/v1/embeddings", json={"model": "white", "input": sentences, "dimensions": 16})
            assert r.status_code == 200
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            assert np.array_equal(got, whole[:, :16])
            r = c.post("/api/embed", json={"model": "white", "input": sentences, "dimensions": 16})
            assert np.array_equal(np.array(r.json()["embeddings"], dtype=np.float32), whole[:, :16])
            # A normalizing server normalizes the shorter vector.
            r = c.post("/v1/embeddings", json={"model": "unit", "input": sentences, "dimensions": 16})
            unit = np.array([d["embedding"] for d in r.json()["data"]])
            assert np.allclose(unit, whole[:, :16] / np.linalg.norm(whole[:, :16], axis=1, keepdims=True), atol=1e-6)
            refusals = [
                ("raw", 100, "needs whitened vectors"),
                ("white", KEEP + 1, "over the"),
                ("white", 0, "positive integer"),
                ("white", "16", "positive integer"),
            ]
            for model, dims, message in refusals:
                for path in ("/v1/embeddings", "/api/embed"):
                    r = c.post(path, json={"model": model, "input": "a", "dimensions": dims})
                    assert r.status_code == 400, r.text
                    assert message in json.dumps(r.json())
            r = c.post("/v1/embeddings", json={"model": "raw", "input": "a", "dimensions": 576})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 576
    finally:
        running.stop()
