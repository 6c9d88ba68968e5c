"""Presets (issue 20): a measured configuration one option away, with the fit it ships.

A preset's logic (resolution per file, shipped fit vs the user's, refusals) runs on the fake backend
(conftest ``fake_model``), with the preset data patched to name the fake file; the shipped data is
checked as data, and applied on smollm2 once."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, counted, fake
from metaeol_edge.layers import resolve_layer
from metaeol_edge.presets import ModelChoice, ShippedFit, get_preset, load_presets
from metaeol_edge.prompts import load_templates

from metaeol_edge import MetaEOL, embedder, identity, presets, registry
from metaeol_edge import postprocess as pp
from metaeol_edge.errors import MetaEOLError, ModelError


def test_every_preset_is_valid_and_its_fits_are_for_registry_files():
    presets = load_presets()
    assert "quality" in presets
    revisions = [*presets.values(), *(e for p in presets.values() for e in p.earlier.values())]
    assert len(revisions) > len(presets)  # quality@1 is kept: what was made with it must open
    for preset in revisions:
        load_templates(preset.templates)
        for model_id, fit in preset.fits.items():
            assert fit.sha256 == registry.get_spec(model_id).sha256, f"{preset.name}'s fit for {model_id}: another file"
            path = preset.shipped_fit(fit.sha256)
            assert path is not None and path.is_file()
            with np.load(path) as data:
                assert data["mean"].ndim == 1 and np.isfinite(data["transform"]).all()
                # A fit made on another model's vectors would fail only at the first encode.
                assert data["mean"].shape == (registry.get_spec(model_id).n_embd,), f"{model_id}'s fit: wrong width"
            assert preset.for_model(fit.sha256).postprocess is not None, f"{model_id}'s fit is never applied"
        for model_id, choice in preset.models.items():
            assert choice.sha256 == registry.get_spec(model_id).sha256, f"{preset.name}'s choice for {model_id}"
            assert choice.chosen, "a per-model choice says why"
            load_templates(preset.for_model(choice.sha256).templates)


def test_a_per_model_choice_applies_to_that_file_only():
    preset = get_preset("quality")
    qwen = registry.get_spec("qwen2.5-coder-1.5b").sha256
    smollm2 = registry.get_spec("smollm2-135m").sha256
    own = preset.for_model(qwen)
    assert own.postprocess is None and preset.postprocess == "whiten:128"  # qwen's dev run: raw is best
    assert (own.templates, own.layer) == (preset.templates, preset.layer)
    small = preset.for_model(smollm2)  # smollm2's dev run: three demonstrations, block 24 and two attention spans
    assert small.templates == "ke-icl-3" != preset.templates
    assert (small.layer, small.combine_layers, small.postprocess) == ((24, "attn:22-30", "attn:22-26"), True, None)
    third = get_preset("quality@3").for_model(smollm2)  # revision 3, kept: blocks 29 and 24 averaged
    assert (third.templates, third.layer, third.combine_layers, third.postprocess) == ("ke-icl-3", (29, 24), True, None)
    assert not preset.combine_layers and not own.combine_layers
    gemma = registry.get_spec("gemma3-270m").sha256
    assert preset.for_model(gemma) == preset.for_model(None) == preset


# The quality preset's fits by revision, byte for byte: a search collection made with one stores its digest, and
# opens only while that revision applies the same bytes. Revision 1's are 0.2's.
QUALITY_FITS = {
    1: {
        "smollm2-135m": "9649251238e2b112c72b8e1a3eb97dcfd2963e06899e1f31b350908bad1726fa",
        "gemma3-270m": "cf55fce2ba019dbd6f6ff62cd9420986c8811043a66fb765b646e2689e2f8ea8",
    },
    2: {
        "smollm2-135m": "b04439a1266c2e2ebc077e948c8da6b7d6f89bd6929cce321dcfb4ab65d4eb3a",
        "gemma3-270m": "324a7e4ba3866f6be8cbd658e9cd0acc36754d9bb9562a9b231c563f116ce95f",
    },
}


def test_a_preset_keeps_its_earlier_revisions_by_name():
    """``quality`` is the current revision; ``quality@N`` names one, earlier ones included, with their own
    templates and fits, which are never remade; an unknown revision is refused, listing the known ones."""
    current = get_preset("quality")
    assert current.revision >= 2 and get_preset(current.pinned) == current and current.label == "quality"
    first = get_preset("quality@1")
    assert (first.name, first.revision, first.pinned, first.label) == ("quality", 1, "quality@1", "quality@1")
    assert first.templates == "prompteol-icl-music" != current.templates
    for revision, fits in QUALITY_FITS.items():
        for model_id, digest in fits.items():
            path = get_preset(f"quality@{revision}").shipped_fit(registry.get_spec(model_id).sha256)
            assert path is not None and identity.sha256_file(path) == digest, f"quality@{revision}'s fit for {model_id}"
    smollm2, gemma3 = (registry.get_spec(m).sha256 for m in ("smollm2-135m", "gemma3-270m"))
    assert first.shipped_fit(gemma3) != current.shipped_fit(gemma3)
    assert current.shipped_fit(smollm2) is None  # revision 3: smollm2's choice is raw, two layers averaged
    known = ", ".join(f"quality@{n}" for n in range(1, current.revision + 1))
    for name in ("quality@9", "quality@", "quality@x", "quality@²"):
        with pytest.raises(MetaEOLError, match=f"has no revision .*; known: {known}$"):
            get_preset(name)
    with pytest.raises(MetaEOLError, match="unknown preset 'nope'"):
        get_preset("nope@1")


def test_a_model_whose_choice_is_raw_gets_raw_vectors(fake_model, sts_sentences, tmp_path, monkeypatch):
    """The embedder resolves the preset for the file it loaded (found by hashing a path): here the fake model
    is given qwen's kind of choice."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    preset = get_preset("quality")
    sha = identity.sha256_file(fake_model)
    raw_choice = ModelChoice(sha, "test", layer=0.5, no_postprocess=True)
    patched = dataclasses.replace(preset, models={"fake": raw_choice})
    monkeypatch.setattr(embedder, "get_preset", lambda name: patched)
    sentences = sts_sentences[:4]
    with fake(fake_model, templates=preset.templates, layer=0.5, cache=False) as plain:
        raw = plain.encode(sentences)
    with fake(fake_model, preset="quality", cache=False) as model:
        assert model.preset is not None and model.preset.postprocess is None
        got = model.encode(sentences)
        assert model.postprocess_source() is None and got.shape == raw.shape
    assert np.allclose(got, raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sets layer"):  # the per-model layer is the one to match
        fake(fake_model, preset="quality", layer=preset.layer)


def _ship_a_fit_for(model: Path, preset_name: str, folder: Path, monkeypatch) -> Path:
    """The preset as if it shipped a fit for ``model`` (made on random vectors of its width): the fit's path.

    Patches the presets' data folder: take any other preset with ``get_preset`` before calling this."""
    preset = get_preset(preset_name)
    sha = identity.sha256_file(model)
    kind = preset.postprocess or "standardize"
    fitted = pp.fit(np.random.default_rng(0).standard_normal((400, 576)).astype(np.float32), kind)
    pp.save(fitted, folder / "fake.npz", {"model": "fake", "fit_on": "random"})
    patched = dataclasses.replace(preset, fits={"fake": ShippedFit("fake.npz", sha, "random")})
    monkeypatch.setattr(embedder, "get_preset", lambda name: patched)
    monkeypatch.setattr(presets, "_data_dir", lambda: folder)
    return folder / "fake.npz"


@pytest.mark.parametrize(
    "preset_name, model_id",
    [("quality", "gemma3-270m"), ("metaeol-icl", "smollm2-135m"), ("quality@2", "smollm2-135m"),
     ("quality@2", "gemma3-270m"), ("quality@1", "smollm2-135m"), ("quality@1", "gemma3-270m")],
)  # fmt: skip
def test_the_shipped_fits_are_for_these_files_and_widths(preset_name, model_id):
    """What the real-model test below relied on for each pair, as data: a fit ships for the registry's file."""
    spec = registry.get_spec(model_id)
    path = get_preset(preset_name).shipped_fit(spec.sha256)
    assert path is not None, f"{model_id}'s file has no shipped fit for {preset_name}"
    with np.load(path) as data:
        assert data["mean"].shape == (spec.n_embd,) and data["transform"].shape[-1] > 0


@pytest.mark.parametrize("preset_name", ["quality", "metaeol-icl"])
def test_a_preset_is_its_templates_layer_and_shipped_fit_on_the_fake(
    preset_name, fake_model, sts_sentences, tmp_path, monkeypatch
):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))  # no user fit in the way
    preset = get_preset(preset_name)
    shipped = _ship_a_fit_for(fake_model, preset_name, tmp_path, monkeypatch)
    sentences = sts_sentences[:5]
    with fake(fake_model, templates=preset.templates, layer=preset.layer, cache=False) as plain:
        raw = plain.encode(sentences)
    with np.load(shipped) as data:  # the fit applied by hand: (x - mean) @ T, or * T per dimension
        mean, transform = data["mean"], data["transform"]
    expected = (raw - mean) @ transform if transform.ndim == 2 else (raw - mean) * transform
    with fake(fake_model, preset=preset_name, cache=False) as model:
        got = model.encode(sentences)
        assert model.dim == expected.shape[1] == got.shape[1]
        assert model.postprocess_source() == shipped
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("preset_name, model_fixture, model_id", [("quality@2", "smollm2", "smollm2-135m")])
def test_a_preset_is_its_templates_layer_and_shipped_fit(
    request, preset_name, model_fixture, model_id, sts_sentences, tmp_path, monkeypatch
):
    """The raw vectors once: the preset's encode reads them from the cache, which shows that its templates and
    layer are the ones named (another key would be a miss), and applies the shipped fit to them."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))  # no user fit in the way
    path_to_model = request.getfixturevalue(model_fixture)
    preset = get_preset(preset_name).for_model(registry.get_spec(model_id).sha256)  # as the file gets it
    sentences = sts_sentences[:3]
    cache = tmp_path / "c.sqlite3"
    with MetaEOL(path_to_model, templates=preset.templates, layer=preset.layer, cache=cache) as plain:
        raw = plain.encode(sentences)
        fingerprint = plain.fingerprint
    path = preset.shipped_fit(fingerprint)
    assert path is not None, f"{model_fixture}'s file has no shipped fit"
    with np.load(path) as data:  # the fit applied by hand: (x - mean) @ T, or * T per dimension
        mean, transform = data["mean"], data["transform"]
    expected = (raw - mean) @ transform if transform.ndim == 2 else (raw - mean) * transform
    with MetaEOL(path_to_model, preset=preset_name, cache=cache) as model:
        got, stats = counted(model, sentences)
        assert stats.misses == 0 and stats.hits > 0  # the preset's prompts are the raw encode's
        assert model.dim == expected.shape[1] == got.shape[1]
        assert model.postprocess_source() == path
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_users_own_fit_wins_over_the_shipped_one(fake_model, sts_sentences, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))
    preset = get_preset("quality")  # before the data folder is patched
    _ship_a_fit_for(fake_model, "quality", tmp_path, monkeypatch)
    corpus, evaluation = sts_sentences[:40], sts_sentences[40:43]
    with fake(fake_model, preset="quality") as model:
        shipped = model.encode(evaluation)
        (path,) = model.fit_postprocess(corpus, kind="standardize", show_progress_bar=False)
        assert model.postprocess_source() == path
    with fake(fake_model, templates=preset.templates, layer=preset.layer) as plain:
        raw_corpus, raw = plain.encode(corpus), plain.encode(evaluation)
    with fake(fake_model, preset="quality") as model:
        own = model.encode(evaluation)
    assert np.allclose(own, (raw - raw_corpus.mean(0)) / raw_corpus.std(0), rtol=1e-4, atol=1e-4)
    assert own.shape != shipped.shape or not np.allclose(own, shipped)


def test_a_preset_refuses_a_mix_and_names_what_to_do(smollm2, fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    preset = get_preset("quality")
    other = "metaeol" if preset.templates != "metaeol" else "prompteol"
    with pytest.raises(ValueError, match="sets templates"):
        MetaEOL(smollm2, preset="quality", templates=other)
    with pytest.raises(ValueError, match="sets layer"):
        MetaEOL(smollm2, preset="quality", layer=resolve_layer(3, 30))
    with pytest.raises(ValueError, match="cannot be off"):
        MetaEOL(smollm2, preset="quality@2", postprocess=False)
    with pytest.raises(ValueError, match="post-processing is fitted per layer"):  # revision 3: two layers, raw
        MetaEOL(smollm2, preset="quality", postprocess=True)
    with pytest.raises(MetaEOLError, match="unknown preset 'best'; known: .*quality"):
        MetaEOL(smollm2, preset="best")
    # A model without a shipped fit (the fake model, which is no registry file): the command that makes one.
    assert preset.shipped_fit(identity.sha256_file(fake_model)) is None
    with fake(fake_model, preset="quality", cache=False) as model:
        with pytest.raises(ModelError, match="fit-postprocess .*--preset quality"):
            model.encode(["A sentence."])


def test_the_cli_lists_presets_and_embeds_with_one():
    r = subprocess.run(
        [sys.executable, "-m", "metaeol_edge", "presets"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "quality:" in r.stdout and "ships a fit for gemma3-270m" in r.stdout
    assert "for smollm2-135m: templates ke-icl-3, layers 24+attn:22-30+attn:22-26 averaged (each at unit" in r.stdout
    assert "quality@1 (templates prompteol-icl-music)" in r.stdout  # an earlier revision, still named
