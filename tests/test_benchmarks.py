"""The benchmark scripts' own logic: rescoring saved embeddings and joining reports of a run done in pieces."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cosine
from metaeol_edge.prompts import preprocess
from test_evaluation import _hashed_bag_of_words

from metaeol_edge import MetaEOL
from metaeol_edge.evaluation import load_sts, load_transfer, run_sts, run_transfer


def script(name: str, *args, cwd=None, env=None):
    cmd = [sys.executable, str(REPO / "benchmarks" / name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{Path(name).stem}", REPO / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rescore_prints_every_saved_score_from_the_files_alone(tmp_path, senteval_root, capsys):
    pytest.importorskip("sklearn")
    sts = run_sts(load_sts("stsb", senteval_root, "test", limit=120), _hashed_bag_of_words, tmp_path / "a")
    trec = run_transfer(load_transfer("trec", senteval_root, limit=120), _hashed_bag_of_words, tmp_path / "a" / "b")
    (tmp_path / "a" / "stray.npy").write_bytes(b"")  # no pair order beside it: not a saved task
    out = script("rescore.py", tmp_path, tmp_path / "a", "--jobs", "1")  # overlapping folders: each task once
    assert out.returncode == 0, out.stderr
    lines = [ln.split("\t") for ln in out.stdout.splitlines()]
    assert sorted(lines) == [
        [str(tmp_path / "a"), "stsb", f"{sts['score']:.2f}"],
        [str(tmp_path / "a" / "b"), "trec", f"{trec['score']:.2f}"],
    ]
    # The two refusals call the script's main() in this process; the run above is its fresh-process test.
    rescore = _load_script("rescore.py")
    (tmp_path / "empty").mkdir()
    assert rescore.main([str(tmp_path / "empty")]) == 1
    assert "no saved embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as typo:
        rescore.main([str(tmp_path), str(tmp_path / "nothing")])
    out, err = capsys.readouterr()
    assert typo.value.code != 0 and "not a folder" in err and not out


def _part(command: str, tasks: list[str], scores: dict[str, float], **meta) -> dict:
    base = {"model": "m.gguf", "torch": "2", "transformers": "5", "device": "cpu", "batch_size": 8, "limit": None}
    row = {"dtype": "float32", "method": "metaeol", "scores": scores}
    return base | meta | {"command": command, "tasks": tasks, "dtypes": ["float32"], "rows": [row]}


def test_merge_joins_pieces_and_refuses_runs_that_do_not_belong_together(tmp_path):
    pieces = {
        "a.json": _part("run a", ["mr", "cr"], {"mr": 80.0, "cr": 86.0}),
        "b.json": _part("run b", ["trec"], {"trec": 89.0}),
        "c.json": _part("run c", ["cr"], {"cr": 86.0}),  # the same score again is fine
    }
    for name, part in pieces.items():
        (tmp_path / name).write_text(json.dumps(part))
    out = script("reference.py", "--merge", *pieces, "--output", tmp_path, "--name", "all", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["parts"] == ["run a", "run b", "run c"] and merged["tasks"] == ["mr", "cr", "trec"]
    (row,) = merged["rows"]
    assert row["scores"] == {"mr": 80.0, "cr": 86.0, "trec": 89.0}
    assert row["transfer_average"] == pytest.approx(np.mean([80.0, 86.0, 89.0]))
    assert "| float32 | metaeol | 80.00 | 86.00 | 89.00 | 85.00 |" in (tmp_path / "all.md").read_text()

    (tmp_path / "d.json").write_text(json.dumps(_part("run d", ["cr"], {"cr": 85.0})))
    clash = script("reference.py", "--merge", "a.json", "d.json", "--output", tmp_path, cwd=tmp_path)
    assert clash.returncode != 0 and "cr is 86.0 in one report and 85.0" in clash.stderr
    (tmp_path / "e.json").write_text(json.dumps(_part("run e", ["trec"], {"trec": 89.0}, device="cuda")))
    other = script("reference.py", "--merge", "a.json", "e.json", "--output", tmp_path, cwd=tmp_path)
    assert other.returncode != 0 and "differ in device" in other.stderr
    (tmp_path / "f.json").write_text(json.dumps(_part("run f", ["trec"], {"trec": 89.0}, limit=100)))
    quick = script("reference.py", "--merge", "a.json", "f.json", "--output", tmp_path, cwd=tmp_path)
    assert quick.returncode != 0 and "differ in limit" in quick.stderr


@pytest.mark.slow
def test_gpu_benchmark_writes_its_rows_on_a_machine_without_a_gpu(tmp_path, smollm2, senteval_root):
    out = tmp_path / "g.json"
    env = os.environ | {"METAEOL_DATA": str(senteval_root)}  # the real data, or in a bare clone the tiny tree
    run = script(
        "gpu.py",
        "--n",
        2,
        "--models",
        "smollm2-135m",
        "--methods",
        "prompteol",
        "--skip-reference",
        "--out",
        out,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["mode"]) for r in rows] == [("llama.cpp", "one-at-a-time"), ("llama.cpp", "packed")]
    for r in rows:
        assert {"model", "method", "device", "n", "sentences_per_s", "cos_min_to_cpu", "gpu_mem_mb"} <= set(r)
        assert r["n"] == 2 and r["sentences_per_s"] > 0 and r["cos_min_to_cpu"] >= 0.999


@pytest.mark.slow
def test_quality_chooses_on_dev_and_every_test_score_is_recomputable_from_saved_files(tmp_path, smollm2_shallow):
    """benchmarks/quality.py on a tiny SentEval tree: the dev stage names a choice, the test stage scores
    it and the fixed rows, and rescore.py gives back each test row's score from the saved vectors alone. The
    script is the subject: it runs smollm2-135m's first 4 blocks (a .gguf path, named by its file name)."""
    from tiny_senteval import write

    root = write(tmp_path / "senteval", n=24)
    common = ["--data", root, "--output", tmp_path / "out", "--templates", "prompteol", "--layers=-1,2",
              "--model", smollm2_shallow]  # fmt: skip
    dev = script("quality.py", "dev", *common, "--dev-pairs", 12, "--dev-fit", 30, "--threads", 1)
    assert dev.returncode == 0, dev.stderr
    assert "dev choice for prompteol (single)" in dev.stdout
    test = script(
        "quality.py", "test", *common, "--tasks", "stsb", "--levers", "raw,standardize,abtt:2",
        "--fit-sentences", 40, "--save-dir", tmp_path / "saved", "--threads", 1,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr
    runs = json.loads((tmp_path / "out" / "quality.json").read_text())["runs"]  # each run's command once
    assert [run["command"].split()[2] for run in runs] == ["dev", "test"]
    rows = [r | {"command": run["command"]} for run in runs for r in run["rows"]]
    tested = [r for r in rows if r["split"] == "test"]
    assert {r["fit_on"] for r in tested} == {"none", "generic", "in-domain"}
    assert {r["model"] for r in rows} == {smollm2_shallow.name}
    assert any(r["dev_choice"] == "single" for r in tested)  # the dev run's choice was scored on test
    assert all(r["command"].startswith("python benchmarks/quality.py") for r in rows)
    assert "| dev, single |" in (tmp_path / "out" / "quality.md").read_text()
    rescored = script("rescore.py", tmp_path / "saved")
    assert rescored.returncode == 0, rescored.stderr
    scores = {tuple(Path(folder).relative_to(tmp_path / "saved").parts): float(score)
              for folder, _, score in (ln.split("\t") for ln in rescored.stdout.splitlines())}  # fmt: skip
    assert len(scores) == len(tested)
    for r in tested:
        layer, lever = r["layer"].replace("+", "_"), r["lever"].replace(":", "-")  # as folder names
        parts = (r["model"], r["method"], layer, lever, r["fit_on"], r["task"])
        assert scores[parts] == pytest.approx(r["spearman"], abs=0.006)


def test_retrieval_benchmark_writes_its_rows_on_the_fake_backend(tmp_path, fake_model, senteval_root):
    """benchmarks/retrieval.py end to end at a tiny size, no model: the rows issue 31 names, and nothing else."""
    out = tmp_path / "r.json"
    env = os.environ | {"METAEOL_DATA": str(senteval_root), "PYTHONPATH": str(REPO)}
    run = script(
        "retrieval.py", "--models", fake_model, "--backend", "fake", "--configs", "metaeol,prompteol + query seeks",
        "--queries", "5",
        "--distractors", "30", "--sizes", "300", "--dim", "16", "--latency-queries", "10", "--sections",
        "retrieval,latency,throughput", "--throughput-chunks", "4", "--reindex-files", "12", "--depths", "64,512",
        "--out", out, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    # The query-side row (issue 31, item 5) comes from its own query prompt, at the documents' layer.
    assert {r["config"] for r in report["retrieval"]} - {"all-MiniLM-L6-v2"} == {"metaeol", "prompteol + query seeks"}
    for row in report["retrieval"]:
        assert {"model", "config", "dataset", "queries", "ndcg10", "recall10", "mrr"} <= set(row)
        assert 0 <= row["ndcg10"] <= 100 and 0 <= row["recall10"] <= 100 and row["queries"] > 0
    assert {r["index"] for r in report["latency"]} >= {"exact"}
    # One graph, searched at each depth asked for (where usearch is installed); exact search has no depth.
    assert [r["depth"] for r in report["latency"]] in ([None], [None, 64, 512])
    for row in report["latency"]:
        assert {"index", "vectors", "dim", "p50_ms", "p95_ms", "recall10", "rss_mb"} <= set(row)
        assert row["vectors"] == 300 and row["dim"] == 16
        # Exact is the yardstick; the graph is built on every core (not bit-reproducible), and near-ties of these
        # tiny random clusters may swap a 10th neighbour. Its recall bar is tests/test_search.py's, on a seeded set.
        assert row["recall10"] == 1.0 if row["index"] == "exact" else row["recall10"] >= 0.95
    assert [r["path"] for r in report["throughput"]] == ["embed", "index"]
    assert all(r["chunks"] == 4 and r["chunks_per_s"] > 0 for r in report["throughput"])
    assert report["reindex"]["files"] == report["reindex"]["unchanged"] == 12  # every file seen, none changed
    assert report["reindex"]["embedded"] == 0


@pytest.mark.slow
def test_quality_reads_a_contrast_as_one_sets_vectors_minus_anothers(smollm2_shallow):
    """Issue 33's lever 2 after the pass: ``a~b:alpha`` is a's vectors minus alpha times b's, each as the engine
    gives them, at every layer read."""
    quality = _load_script("quality.py")
    sentences = ["A man is playing a flute.", 'He said "hello" to me']
    contrast = quality.vectors_for(str(smollm2_shallow), "prompteol~cp-aux:0.5", [-1, 2], 8, 1)
    contrast.need(sentences, "two sentences")
    with MetaEOL(smollm2_shallow, templates="prompteol", layer=[-1, 2], cache=False, n_threads=1) as model:
        main = model.encode(sentences)
    with MetaEOL(smollm2_shallow, templates="cp-aux", layer=[-1, 2], cache=False, n_threads=1) as model:
        aux = model.encode(sentences)
    for i, layer in enumerate([-1, 2]):
        np.testing.assert_allclose(contrast.get(sentences, (layer,)), main[i] - 0.5 * aux[i], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quality_steers_contrastive_prompting_inside_the_pass_at_one_block(smollm2):
    """``a+cp:ACT:COEFF`` (benchmarks/_steering.py, the authors' ``scaled`` plan at the attention output's input):
    with nothing subtracted and a coefficient of 1 it reads PyTorch's vectors, which agree with the engine's and
    with ``a+pt``'s; steering leaves every state below block ACT's output as it was and moves the ones from it
    on."""
    pytest.importorskip("torch")
    quality = _load_script("quality.py")
    sentences = ["A man is playing a flute.", 'He said "hello" to me']
    layers = [-1, 4, 5]  # hidden_states[4] is block 4's input (0-based), hidden_states[5] its output
    steered = quality.vectors_for(str(smollm2), "prompteol+cp:4:0.5", layers, 8, None)
    texts = [steered.templates[0].render(s) for s in (preprocess(t) for t in sentences)]
    steered.coeff = 1.0  # C = 1 and B = 0 below: A is left as it was
    plain = steered._steered(texts, 0.0 * steered._values_of_aux(texts))
    with MetaEOL(smollm2, templates="prompteol", layer=layers, cache=False, n_threads=1) as model:
        engine = model.encode(sentences)
    for got, want in zip(plain, engine, strict=True):
        assert cosine(got, want).min() >= 0.999  # Q4_1 dequantized to float32 in PyTorch, against llama.cpp
    # ``+pt``, the steered rows' baseline, is the same pass with no hook.
    unsteered = quality.vectors_for(str(smollm2), "prompteol+pt", layers, 8, None).read(sentences)
    for got, want in zip(unsteered, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    steered.coeff = 0.5
    moved = steered.read(sentences)
    assert np.allclose(moved[1], plain[1], atol=1e-5)  # block 4's input: before the steered projection
    assert cosine(moved[2], plain[2]).max() < 0.9999 and cosine(moved[0], plain[0]).max() < 0.99999


def test_quality_averages_or_concatenates_two_layers():
    """Issue 33's lever 4: ``29+24`` averages two layers' vectors, ``cat:29+24`` puts them side by side, each
    layer scaled to unit mean norm first; ``unit:29+24`` averages each sentence's vectors at unit length; the
    names read back as the options they came from."""
    quality = _load_script("quality.py")
    store = quality.Store()
    store.spec, store.layers = "t", [29, 24]
    store.start(2)
    a, b = np.array([[3.0, 4.0], [0.0, 10.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    store.read = lambda sentences: [a, b]
    store.need(["x", "y"], "two")
    scaled = [a / 7.5, b / 1.0]  # each layer's mean norm: 7.5 (rows of 5 and 10) and 1
    np.testing.assert_allclose(store.get(["x", "y"], (29, 24)), (scaled[0] + scaled[1]) / 2, rtol=1e-6)
    cat, unit = quality.MODES["cat"], quality.MODES["unit"]
    joined = store.get(["y", "x"], (cat, 29, 24))
    np.testing.assert_allclose(joined, np.concatenate(scaled, axis=1)[[1, 0]], rtol=1e-6)
    own = [a / np.linalg.norm(a, axis=1, keepdims=True), b]  # each sentence's vector at unit length: b's are
    np.testing.assert_allclose(store.get(["x", "y"], (unit, 29, 24)), (own[0] + own[1]) / 2, rtol=1e-6)
    spans = [("attn:22-30",), (unit, 24, "attn:22-30", "attn:1-2")]
    for option in [(-1,), (29, 24), (cat, -1, 24), (unit, 29, 24), *spans]:
        assert quality.parse_layer_name(quality.layer_name(option)) == option
    assert quality.layer_name((cat, -1, 24)) == "cat:final+24" and quality.layer_name((unit, 30, 2)) == "unit:30+2"
    # Attention spans (lever 5) keep their own colon: a span is no mode.
    assert quality.layer_name((unit, 24, "attn:22-30")) == "unit:24+attn:22-30"
    assert quality.parse_layer_name("attn:22-30") == ("attn:22-30",)
