"""Presets (issue 20): a measured configuration one option away, with the fit it ships."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from metaeol_edge import MetaEOL, registry
from metaeol_edge.errors import MetaEOLError, ModelError
from metaeol_edge.layers import resolve_layer
from metaeol_edge.presets import get_preset, load_presets
from metaeol_edge.prompts import load_templates


def test_every_preset_is_valid_and_its_fits_are_for_registry_files():
    presets = load_presets()
    assert "quality" in presets
    for preset in presets.values():
        load_templates(preset.templates)
        for model_id, fit in preset.fits.items():
            assert fit.sha256 == registry.get_spec(model_id).sha256, f"{preset.name}'s fit for {model_id}: another file"
            path = preset.shipped_fit(fit.sha256)
            assert path is not None and path.is_file()
            with np.load(path) as data:
                assert data["mean"].ndim == 1 and np.isfinite(data["transform"]).all()


def test_the_quality_preset_is_its_templates_layer_and_shipped_fit(smollm2, sts_sentences, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))  # no user fit in the way
    preset = get_preset("quality")
    sentences = sts_sentences[:5]
    with MetaEOL(smollm2, templates=preset.templates, layer=preset.layer, cache=False) as plain:
        raw = plain.encode(sentences)
        fingerprint = plain.fingerprint
    path = preset.shipped_fit(fingerprint)
    assert path is not None, "the default model's file has no shipped fit"
    with np.load(path) as data:  # the fit applied by hand: (x - mean) @ T, or * T per dimension
        mean, transform = data["mean"], data["transform"]
    expected = (raw - mean) @ transform if transform.ndim == 2 else (raw - mean) * transform
    with MetaEOL(smollm2, preset="quality", cache=False) as model:
        got = model.encode(sentences)
        assert model.dim == expected.shape[1] == got.shape[1]
        assert model.postprocess_source() == path
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_users_own_fit_wins_over_the_shipped_one(smollm2, sts_sentences, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    corpus, evaluation = sts_sentences[:40], sts_sentences[40:43]
    with MetaEOL(smollm2, preset="quality") as model:
        shipped = model.encode(evaluation)
        (path,) = model.fit_postprocess(corpus, kind="standardize", show_progress_bar=False)
        assert model.postprocess_source() == path
    preset = get_preset("quality")
    with MetaEOL(smollm2, templates=preset.templates, layer=preset.layer) as plain:
        raw_corpus, raw = plain.encode(corpus), plain.encode(evaluation)
    with MetaEOL(smollm2, preset="quality") as model:
        own = model.encode(evaluation)
    assert np.allclose(own, (raw - raw_corpus.mean(0)) / raw_corpus.std(0), rtol=1e-4, atol=1e-4)
    assert own.shape != shipped.shape or not np.allclose(own, shipped)


def test_a_preset_refuses_a_mix_and_names_what_to_do(smollm2, gemma3, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    preset = get_preset("quality")
    other = "metaeol" if preset.templates != "metaeol" else "prompteol"
    with pytest.raises(ValueError, match="sets templates"):
        MetaEOL(smollm2, preset="quality", templates=other)
    with pytest.raises(ValueError, match="sets layer"):
        MetaEOL(smollm2, preset="quality", layer=resolve_layer(3, 30))
    with pytest.raises(ValueError, match="cannot be off"):
        MetaEOL(smollm2, preset="quality", postprocess=False)
    with pytest.raises(MetaEOLError, match="unknown preset 'best'; known: .*quality"):
        MetaEOL(smollm2, preset="best")
    if "gemma3-270m" not in preset.fits:  # a model without a shipped fit: the command that makes one
        with MetaEOL(gemma3, preset="quality", cache=False) as model:
            with pytest.raises(ModelError, match="fit-postprocess .*--preset quality"):
                model.encode(["A sentence."])


def test_the_cli_lists_presets_and_embeds_with_one():
    r = subprocess.run(
        [sys.executable, "-m", "metaeol_edge", "presets"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "quality:" in r.stdout and "ships a fit for smollm2-135m" in r.stdout
