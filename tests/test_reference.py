"""The PyTorch reference against the llama.cpp engine, on the F32 versions of the shipped models.

Runs when the reference extra (torch, transformers) is installed; `.ci/run` installs it.
"""

import json

import numpy as np
import pytest
from conftest import cosine
from conftest import run_cli as run
from metaeol_edge.cli import main

from metaeol_edge import MetaEOL, registry
from metaeol_edge.evaluation import rescore_saved

pytest.importorskip("torch")
pytest.importorskip("transformers")

from metaeol_edge.reference import Reference  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "Is the cat on the mat?",
    'He said "hello" twice',
    "Ünïcödé café, naïve façade",
    "The stock market fell sharply today after a long rally in technology shares.",
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_id", "n_layer"), [("smollm2-135m", 30), ("gemma3-270m", 18)])
def test_engine_layers_match_pytorch_hidden_states_on_the_f32_model(model_id, n_layer):
    path = registry.quantized(model_id, "f32")
    layers = [1, n_layer // 2, n_layer, -1]
    sentences = SENTENCES[2:]  # quotes, accents and a long one: 24 prompts per layer, every template
    ref = Reference(path, "metaeol", layer=layers).encode(sentences, per_template=True)
    with MetaEOL(path, "metaeol", layer=layers, cache=False, early_exit=False) as model:
        got = model.encode(sentences, per_template=True)
    for layer, r, g in zip(layers, ref, got, strict=True):
        assert r.shape == g.shape == (len(sentences), 8, model.dim)
        cos = cosine(r, g)
        print(f"{model_id} layer {layer}: min cosine to PyTorch {cos.min():.6f}")  # shown with pytest -s
        assert cos.min() >= 0.999, (layer, cos.min())


@pytest.mark.slow
def test_left_padding_changes_no_prompt(smollm2):
    path = registry.quantized("smollm2-135m", "f32")
    ref = Reference(path, "prompteol")
    batched = ref.encode(SENTENCES, batch_size=5)  # prompts of different lengths, padded on the left
    alone = np.stack([ref.encode([s], batch_size=1)[0] for s in SENTENCES])
    assert cosine(batched, alone).min() >= 0.9999


@pytest.mark.slow
def test_eval_reference_scores_what_the_engine_scores_on_the_f32_model(tmp_path, monkeypatch, senteval_root, capsys):
    monkeypatch.setenv("METAEOL_DATA", str(senteval_root))
    args = ["-m", "smollm2-135m", "--level", "f32", "-t", "prompteol", "--tasks", "stsb", "--limit", "40", "--json"]
    # In this process (PyTorch is loaded already); the command in a fresh process is the hub case below.
    capsys.readouterr()
    assert main(["eval", *args, "-q", "--reference", "--device", "cpu", "--save-embeddings", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert main(["eval", *args, "-q", "--no-cache"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert r["backend"] == "pytorch cpu float32" and e["backend"] == "llama.cpp"
    assert r["model"] == e["model"] == "smollm2-135m" and r["level"] == e["level"] == "f32"
    assert r["model_file"] == e["model_file"] and r["layer"] == e["layer"] == -1
    # Cosine 1.000000 between the two backends' vectors: the same ranking, up to near-ties.
    assert r["scores"]["stsb"] == pytest.approx(e["scores"]["stsb"], abs=0.1)
    assert rescore_saved(tmp_path, "stsb") == pytest.approx(r["scores"]["stsb"], abs=1e-6)
    # The argument errors in process (exit code and message are main's); the hub one below in a fresh process.
    for argv, message in [
        (["--reference", "--postprocess"], "--postprocess applies to the llama.cpp engine only"),
        (["--dtype", "float16"], "--dtype only apply with --reference"),
        (["--reference", "--level", "f16", "-m", "some/hf-model"], "--level needs a registry id or a .gguf file"),
    ]:
        model = [] if "-m" in argv else ["-m", "smollm2-135m"]
        assert main(["eval", *argv, *model, "--tasks", "stsb", "--limit", "4"]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that is not here: one clear line, no traceback
    bad = run("eval", "--reference", "-m", "nobody/no-such-model", "--tasks", "stsb", "--limit", "4")
    assert bad.returncode == 2 and "transformers cannot load 'nobody/no-such-model'" in bad.stderr
    assert "Traceback" not in bad.stderr
