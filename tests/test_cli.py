"""The ``metaeol`` command. Its logic runs on the fake backend (``--backend fake``, conftest); the first
test is the command's end-to-end test on the real engine."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE, fake
from conftest import run_cli as run
from metaeol_edge.cli import main
from metaeol_edge.corpus import read_sentences

from metaeol_edge import MetaEOL


@pytest.fixture
def sentences_file(tmp_path, sts_sentences):
    path = tmp_path / "s.txt"
    path.write_text("\n".join(sts_sentences[:5]) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_embed_writes_npy_rows_in_input_order(tmp_path, sts_sentences, smollm2, capsys):
    """The command's end-to-end test on the real engine: one run in a fresh process (a registry id, MetaEOL's 8
    templates), then two in this process (-t, a path, the cache). Two sentences show the rows' order."""
    src = tmp_path / "s.txt"
    src.write_text("\n".join(sts_sentences[:2]) + "\n", encoding="utf-8")
    out = tmp_path / "e.npy"
    r = run("embed", "--model", "smollm2-135m", "--input", src, "--output", out)
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (2, 576)
    with MetaEOL("smollm2-135m", cache=False) as m:
        assert np.array_equal(got, m.encode(sts_sentences[:2]))
    capsys.readouterr()
    prompteol = ["embed", "--model", str(smollm2), "-t", "prompteol", "-i", str(src), "-o", str(tmp_path / "p.npy")]
    assert main(prompteol) == 0
    assert "0 cached and 2 computed" in capsys.readouterr().err  # prompteol vectors are new
    assert main(["embed", "--model", str(smollm2), "-i", str(src), "-o", str(tmp_path / "again.npy")]) == 0
    assert "16 cached and 0 computed" in capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "again.npy"), got)


def test_embed_reads_jsonl_and_writes_jsonl(tmp_path, sts_sentences):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(sts_sentences[:3])))
    out = tmp_path / "out.jsonl"
    assert main(["embed", *FAKE, "-t", "prompteol", "-i", str(src), "-o", str(out), "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == sts_sentences[:3] and len(rows[0]["embedding"]) == 576


def test_similarity_prints_a_cosine():
    r = run("similarity", *FAKE, "-t", "prompteol", "A man plays a guitar.", "Someone plays music.")
    assert r.returncode == 0, r.stderr
    assert 0.0 < float(r.stdout.strip()) <= 1.0


def test_bad_options_and_unwritable_output_are_errors(tmp_path, sentences_file, capsys):
    assert main(["embed", *FAKE, "-i", str(sentences_file), "-o", str(tmp_path / "o.npy"), "--batch-size", "0"]) == 2
    assert "batch_size must be a positive integer" in capsys.readouterr().err
    assert main(["embed", *FAKE, "-i", str(sentences_file), "-o", str(tmp_path / "o.csv")]) == 2
    assert "must end in .npy, .jsonl or .parquet" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    argv = ["embed", *FAKE, "-t", "prompteol", "-i", str(sentences_file), "-o", str(tmp_path / "file" / "o.npy")]
    assert main(argv) == 2
    assert "error: " in capsys.readouterr().err


def test_read_sentences_keeps_text_as_given(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("\ufeffA first line.\r\nA second one\n", encoding="utf-8")
    assert read_sentences(path) == ["A first line.", "A second one"]


def _main(capsys, *args):
    """``main`` in this process: (exit code, stdout, stderr). An uncaught exception fails the test, so an
    error that reaches the user as one line and exit code 2 printed no traceback."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _embed_with_model(tmp_path, model, *extra):
    src = tmp_path / "s.txt"
    src.write_text("hello\n")
    return "embed", "--model", model, "-i", src, "-o", tmp_path / "o.npy", *extra


def test_unknown_model_id(tmp_path):
    """The model errors' one end-to-end run: a fresh process, exit code 2, one line and no traceback."""
    r = run(*_embed_with_model(tmp_path, "no-such-model"))
    assert r.returncode == 2 and "unknown model id 'no-such-model'" in r.stderr and "Traceback" not in r.stderr


def test_missing_truncated_and_non_gguf_model_files(tmp_path, smollm2, capsys):
    code, _, err = _main(capsys, *_embed_with_model(tmp_path, tmp_path / "absent.gguf"))
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    code, _, err = _main(capsys, *_embed_with_model(tmp_path, bad))
    assert code == 2 and "not a GGUF model file" in err
    cut = tmp_path / "cut.gguf"
    with smollm2.open("rb") as f:
        cut.write_bytes(f.read(20_000_000))
    code, _, err = _main(capsys, *_embed_with_model(tmp_path, cut))
    assert code == 2 and "truncated" in err and "Traceback" not in err


def test_template_file_without_placeholder(tmp_path, capsys):
    t = tmp_path / "t.txt"
    t.write_text("no placeholder in this template\n")
    code, _, err = _main(capsys, *_embed_with_model(tmp_path, "smollm2-135m", "--templates", t))
    assert code == 2 and str(t) in err and "exactly once" in err


def test_no_truncate_refuses_a_long_sentence(tmp_path, capsys):
    src = tmp_path / "long.txt"
    src.write_text(" ".join(["word"] * 600) + "\n")
    common = ["embed", *FAKE, "-i", src, "-o", tmp_path / "o.npy", "-t", "prompteol", "--max-length", "128"]
    code, _, err = _main(capsys, *common, "--no-truncate")
    assert code == 2 and "over max_length 128" in err
    code, _, err = _main(capsys, *common)
    assert code == 0 and "warning: sentence #1 was truncated" in err


def test_models_and_cache_verbs(capsys):
    """`models list` in a fresh process (the models/cache family's end-to-end run); the rest in process."""
    r = run("models", "list")
    assert r.returncode == 0 and "smollm2-135m*" in r.stdout and "gemma3-270m" in r.stdout
    code, out, _ = _main(capsys, "models", "path", "smollm2-135m")
    assert code == 0 and out.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    code, out, _ = _main(capsys, "cache", "path")
    assert code == 0 and out.strip().endswith("embeddings.sqlite3")
    code, out, _ = _main(capsys, "cache", "stats", "--json")
    assert code == 0 and "entries" in json.loads(out)
    assert _main(capsys, "models", "rm", "no-such-model")[0] == 2


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "metaeol"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "metaeol-edge 0.2.0" in r.stdout


def test_embed_at_a_layer_and_with_a_fitted_postprocessing(
    tmp_path, sentences_file, sts_sentences, fake_model, monkeypatch, capsys
):
    """fit-postprocess in a fresh process (its family's end-to-end run); the embeds in process."""
    # fits are written to the store; keep the user's clean (the model is given by path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sts_sentences[20:60]) + "\n", encoding="utf-8")
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))
    common = [*FAKE, "-m", fake_model, "-t", "prompteol", "--layer", "0.5"]
    code, _, err = _main(capsys, "embed", *common, "-i", sentences_file, "-o", tmp_path / "raw.npy", "--postprocess")
    assert code == 2 and "run: metaeol fit-postprocess" in err
    r = run("fit-postprocess", *common, "-i", corpus, "-q")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file() and "fitted on 40 sentences" in r.stderr
    assert _main(capsys, "embed", *common, "-i", sentences_file, "-o", tmp_path / "raw.npy", "-q")[0] == 0
    assert (
        _main(capsys, "embed", *common, "-i", sentences_file, "-o", tmp_path / "pp.npy", "-q", "--postprocess")[0] == 0
    )
    raw, post = np.load(tmp_path / "raw.npy"), np.load(tmp_path / "pp.npy")
    assert raw.shape == post.shape == (5, 576) and not np.allclose(raw, post)
    with fake(fake_model, "prompteol", layer=15, cache=False) as m:
        assert np.array_equal(raw, m.encode(sts_sentences[:5]))
    code, _, err = _main(
        capsys, "embed", *FAKE, "-m", fake_model, "--layer", "31", "-i", sentences_file, "-o", tmp_path / "x.npy"
    )
    assert code == 2 and "out of range" in err


def test_models_quantize_refuses_unknown_levels(capsys):
    code, _, err = _main(capsys, "models", "quantize", "smollm2-135m", "--to", "f16,q9_9")
    assert code == 2 and "unknown level(s) q9_9" in err
