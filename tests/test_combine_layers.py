"""Layer ensembles (issue 33, lever 4): several layers' vectors averaged into one, each at unit length first.

On the fake backend (conftest ``fake_model``, 30 blocks): the combination is the mean of the layers' own
vectors scaled to unit length, from the same cache entries; what cannot follow it is refused; a collection and
a bulk job tell it apart from its layers read one by one; a preset can name it for one model file."""

import dataclasses

import numpy as np
import pytest
from conftest import FAKE, counted, fake
from metaeol_edge.presets import ModelChoice, get_preset

from metaeol_edge import MetaEOL, embedder, identity, presets, registry
from metaeol_edge.core.config import EmbedConfig, decisive_options
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.faces.search import config as search_config


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_combination_is_the_mean_of_its_layers_at_unit_length(fake_model, sts_sentences, tmp_path):
    sentences = sts_sentences[:6]
    cache = tmp_path / "c.sqlite3"
    with fake(fake_model, templates="prompteol", layer=[29, 24], cache=cache) as each:
        a, b = each.encode(sentences)
    with fake(fake_model, templates="prompteol", layer=[29, 24], combine_layers=True, cache=cache) as model:
        got, stats = counted(model, sentences)
        assert stats.misses == 0  # the layers' own cache entries: nothing recomputed
        assert got.shape == (6, 576) and model.dim == 576
        one = model.encode(sentences[0])
        normed = model.encode(sentences, normalize_embeddings=True)
        streamed = np.stack(list(model.encode_iter(sentences)))
    assert not np.allclose(_unit(a), _unit(b))  # two different reads, or the test shows nothing
    expected = (_unit(a) + _unit(b)) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normed, _unit(expected), rtol=1e-5, atol=1e-6)
    # The order of the layers does not change a mean.
    with fake(fake_model, templates="prompteol", layer=[24, 29], combine_layers=True, cache=cache) as model:
        np.testing.assert_allclose(model.encode(sentences), expected, rtol=1e-5, atol=1e-6)


def test_what_cannot_follow_a_combination_is_refused(fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="give two or more"):
        fake(fake_model, layer=29, combine_layers=True, cache=False)
    with pytest.raises(ValueError, match="give two or more"):
        fake(fake_model, layer=[29], combine_layers=True, cache=False)
    with pytest.raises(ValueError, match="post-processing is fitted per layer"):
        fake(fake_model, layer=[29, 24], combine_layers=True, postprocess=True, cache=False)
    with pytest.raises(ValueError, match="needs whitened vectors"):  # raw vectors: a prefix means nothing
        fake(fake_model, layer=[29, 24], combine_layers=True, truncate_dim=64, cache=False)
    with fake(fake_model, layer=[29, 24], combine_layers=True, cache=False) as model:
        with pytest.raises(ValueError, match="per_template vectors are each layer's own"):
            model.encode(["A sentence."], per_template=True)
        with pytest.raises(ValueError, match="post-processing is fitted per layer"):
            model.fit_postprocess(["One.", "Two."])
        assert model.similarity("A man plays a guitar.", "A man plays a guitar.") == pytest.approx(1.0)


def test_a_collection_and_a_job_tell_a_combination_from_one_layer(fake_model, tmp_path):
    with fake(fake_model, layer=[29, 24], combine_layers=True, cache=False) as both:
        combined = search_config.identity(both, overlap=0)
    with fake(fake_model, layer=29, cache=False) as one:
        single = search_config.identity(one, overlap=0)
    with fake(fake_model, layer=[29, 24], cache=False) as each, pytest.raises(Exception, match="--combine-layers"):
        search_config.identity(each, overlap=0)
    assert combined["layer"] == [29, 24] and single["layer"] == 29
    assert search_config.differing(combined, single) == ["layer"]
    # A bulk job's options: the combination decides its vectors; options written before the setting existed
    # (0.2's job.json holds only what was passed) are the layers read one by one.
    with_it = EmbedConfig.of(layer=[29, 24], combine_layers=True).identity()
    without = EmbedConfig.of(layer=[29, 24]).identity()
    assert with_it != without and decisive_options({"layer": [29, 24]}) == without
    assert with_it["combine_layers"] is True


def test_a_preset_can_name_a_combination_for_one_file(fake_model, sts_sentences, tmp_path, monkeypatch):
    """The fake file given smollm2-135m's kind of choice: two blocks averaged, no fit."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    preset = get_preset("quality")
    sha = identity.sha256_file(fake_model)
    choice = ModelChoice(sha, "test", templates="prompteol", layer=(29, 24), no_postprocess=True, combine_layers=True)
    patched = dataclasses.replace(preset, models={"fake": choice})
    monkeypatch.setattr(embedder, "get_preset", lambda name: patched)
    sentences = sts_sentences[:4]
    cache = tmp_path / "c.sqlite3"
    with fake(fake_model, templates="prompteol", layer=[29, 24], combine_layers=True, cache=cache) as plain:
        expected = plain.encode(sentences)
    with fake(fake_model, preset="quality", cache=cache) as model:
        assert model.combine_layers and model.layers == (29, 24) and model.postprocess_source() is None
        got, stats = counted(model, sentences)
    assert stats.misses == 0
    np.testing.assert_array_equal(got, expected)
    # The preset's own layers may be named again (as a list or a tuple); others, or a fit, are refused.
    with fake(fake_model, preset="quality", layer=[29, 24], cache=False):
        pass
    with pytest.raises(ValueError, match="sets layer=29,24"):
        fake(fake_model, preset="quality", layer=[29, 23], cache=False)
    with pytest.raises(ValueError, match="post-processing is fitted per layer"):
        fake(fake_model, preset="quality", postprocess=True, cache=False)


def test_a_combination_in_the_preset_data_is_checked_when_loaded():
    base = {"description": "d", "templates": "prompteol", "layer": [29, 24], "postprocess": None}
    made = presets._preset("p", base | {"combine_layers": True}, 1, {})
    assert made.layer == (29, 24) and made.combine_layers
    for bad in (
        base | {"combine_layers": True, "postprocess": "whiten:128"},  # a fit is per layer
        base | {"combine_layers": True, "layer": 1.0},  # one layer
        base,  # several layers, one vector: combine_layers must say how
    ):
        with pytest.raises(MetaEOLError, match="preset 'p@1'"):
            presets._preset("p", bad, 1, {})
    sha = registry.get_spec("smollm2-135m").sha256
    own = {"sha256": sha, "chosen": "c", "layer": [29, 24], "combine_layers": True, "postprocess": "whiten:128"}
    with pytest.raises(MetaEOLError, match="combine_layers needs two or more layers and no post-processing"):
        presets._preset("p", base | {"layer": 1.0, "postprocess": "whiten:128", "models": {"m": own}}, 1, {})


def test_the_shell_combines_layers(fake_model, sts_sentences, tmp_path, capsys):
    from metaeol_edge.faces.cli import main

    src = tmp_path / "s.txt"
    src.write_text("\n".join(sts_sentences[:3]) + "\n", encoding="utf-8")
    common = [*FAKE, "-m", str(fake_model), "-t", "prompteol", "--layer", "29,24", "-i", str(src), "-q", "--no-cache"]
    assert main(["embed", *common, "--combine-layers", "-o", str(tmp_path / "c.npy")]) == 0
    assert main(["embed", *common, "-o", str(tmp_path / "each.npy")]) == 0
    combined, each = np.load(tmp_path / "c.npy"), np.load(tmp_path / "each.npy")
    assert combined.shape == (3, 576) and each.shape == (2, 3, 576)  # one vector per layer without the flag
    np.testing.assert_allclose(combined, (_unit(each[0]) + _unit(each[1])) / 2, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["embed", *common, "--combine-layers", "--dim", "64", "-o", str(tmp_path / "d.npy")]) == 2
    assert "needs whitened vectors" in capsys.readouterr().err


@pytest.mark.slow
def test_the_quality_preset_on_smollm2_is_its_reads_averaged(smollm2, sts_sentences, tmp_path, monkeypatch):
    """On the real file: revision 4's choice for smollm2-135m reads the cache entries of ke-icl-3 at block 24 and
    the attention spans 22-30 and 22-26 (another prompt, read or early exit would be a miss) and averages them at
    unit length."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))
    sentences = sts_sentences[:3]
    cache = tmp_path / "c.sqlite3"
    with MetaEOL(smollm2, templates="ke-icl-3", layer=[24, "attn:22-30", "attn:22-26"], cache=cache) as each:
        a, b, c = each.encode(sentences)
    with MetaEOL(smollm2, preset="quality", cache=cache) as model:
        assert model.preset is not None and model.preset.revision >= 4
        got, stats = counted(model, sentences)
    assert stats.misses == 0 and stats.hits == 9
    np.testing.assert_allclose(got, (_unit(a) + _unit(b) + _unit(c)) / 3, rtol=1e-5, atol=1e-6)


def test_the_server_serves_a_combination_and_refuses_layers_without_one(fake_model, sts_sentences, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import threading
    import time

    from metaeol_edge.faces.cli import main
    from metaeol_edge.faces.server import Limits, ModelWorker, make_server

    assert main(["serve", *FAKE, "-m", str(fake_model), "--layer", "29,24"]) == 2
    assert "several --layer values need --combine-layers" in capsys.readouterr().err
    sentences = sts_sentences[:3]
    model = fake(fake_model, "prompteol", layer=[29, 24], combine_layers=True, cache=False)
    expected = model.encode(sentences)
    workers = {"m": ModelWorker("m", model, Limits())}
    server, sock, url = make_server(workers, "127.0.0.1", 0, Limits(), None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "m", "input": sentences}, timeout=30)
        assert r.status_code == 200, r.text
        got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        assert [m["layer"] for m in status["models"]] == [[29, 24]]
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "m", "input": sentences, "dimensions": 64}, timeout=30)
        assert r.status_code == 400 and "needs whitened vectors" in r.text
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        for w in workers.values():
            w.stop()
            w.model.close()
