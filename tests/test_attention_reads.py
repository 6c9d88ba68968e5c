"""Attention spans (issue 33, lever 5: AlignedWVA, arXiv 2602.01572): ``layer="attn:22-30"`` reads the attention
outputs of blocks 22..30 at the read token (after each block's output projection, before its residual add) and
averages them.

The spelling is resolved once and checked where a backend is given it; the llama.cpp engine reads each block's
``attn_out`` tensor and averages them, PyTorch hooks each block's ``self_attn``, and the two agree on the real
file; a span is a read like a layer everywhere else (cache, combination, presets, the shell)."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FAKE, cosine, counted, fake

from metaeol_edge import MetaEOL, presets, registry
from metaeol_edge.backends.engine import Engine, _read_value
from metaeol_edge.backends.tensors import _tensor_names
from metaeol_edge.errors import MetaEOLError, ModelError
from metaeol_edge.methods.layers import (
    attention_span,
    check_resolved,
    early_exit_blocks,
    resolve_layer,
    resolve_layers,
    top_block,
)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_span_is_resolved_to_one_spelling_and_checked():
    assert resolve_layer("attn:22-30", 30) == "attn:22-30"
    assert resolve_layer(" attn: 5 ", 30) == "attn:5-5"  # one block is a span of one
    assert resolve_layers([29, "attn:22-30"], 30) == ((29, "attn:22-30"), True)
    assert attention_span("attn:22-30") == (22, 30) and attention_span(29) is None
    for bad, why in [
        ("attn:30-22", "first <= last"),
        ("attn:0-3", "within blocks 1..30"),
        ("attn:22-31", "within blocks 1..30"),
        ("attn:a-b", "attn:FIRST-LAST"),
        ("attn:", "attn:FIRST-LAST"),
    ]:
        with pytest.raises(ValueError, match=why):
            resolve_layer(bad, 30)
    check_resolved([-1, 30, "attn:1-30"], 30)
    for bad in ["attn:22-31", "attn:5", "attn: 5-6", "block:5"]:  # a backend takes the one spelling only
        with pytest.raises(ValueError, match="not an attention span"):
            check_resolved([bad], 30)
    # A span needs its last block computed: early exit stops there, and never below a layer asked for.
    assert top_block("attn:10-20", 30) == 20 and top_block(-1, 30) == 30 and top_block(7, 30) == 7
    assert early_exit_blocks(["attn:10-20"], 30) == 20
    assert early_exit_blocks(["attn:10-20", 24], 30) == 24
    assert early_exit_blocks(["attn:22-30"], 30) is None


def test_the_engine_reads_a_span_as_the_mean_of_its_blocks_attention_outputs():
    assert _tensor_names("attn:2-4") == [b"attn_out-1", b"attn_out-2", b"attn_out-3"]
    # Overlapping spans and a layer in one pass: each tensor is asked for once, each read gets its own slots.
    engine = SimpleNamespace()
    slots = Engine._want(engine, ["attn:22-24", "attn:23-25", 24, -1])
    names = {name: slot for name, slot in engine._wanted.items()}
    assert len(names) == 6  # attn_out-21..24, l_out-23, result_norm
    assert slots == [
        [names[b"attn_out-21"], names[b"attn_out-22"], names[b"attn_out-23"]],
        [names[b"attn_out-22"], names[b"attn_out-23"], names[b"attn_out-24"]],
        [names[b"l_out-23"]],
        [names[b"result_norm"]],
    ]
    assert _tensor_names(-1) == [b"result_norm"] and _tensor_names(3) == [b"l_out-2"]
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 8), dtype=np.float32) for _ in range(3)]
    one = _read_value(rows, [1])  # one tensor, one row: taken as it is, no mean computed
    assert np.array_equal(one, rows[1][0]) and np.shares_memory(one, rows[1])
    np.testing.assert_allclose(_read_value(rows, [0, 2]), (rows[0][0] + rows[2][0]) / 2, rtol=1e-6)
    pooled = [rng.standard_normal((4, 8), dtype=np.float32) for _ in range(2)]  # a pooled span of token rows
    expected = (pooled[0].mean(0) + pooled[1].mean(0)) / 2
    np.testing.assert_allclose(_read_value(pooled, [0, 1]), expected, rtol=1e-5)


def test_a_span_is_a_read_like_a_layer(fake_model, sts_sentences, tmp_path):
    sentences = sts_sentences[:5]
    cache = tmp_path / "c.sqlite3"
    with fake(fake_model, templates="prompteol", layer=[24, "attn:22-30", "attn:22-26"], cache=cache) as each:
        a, b, c = each.encode(sentences)
        assert each.read == 24 and each.layers == (24, "attn:22-30", "attn:22-26")
    assert not np.allclose(b, c) and not np.allclose(a, b)  # each read its own vectors
    with fake(fake_model, templates="prompteol", layer="attn:22-30", cache=cache) as span:
        got, stats = counted(span, sentences)
        assert span.read == "attn:22-30"
    assert stats.misses == 0  # the span's own cache entries
    np.testing.assert_array_equal(got, b)
    with fake(fake_model, templates="prompteol", layer=[24, "attn:22-30", "attn:22-26"], combine_layers=True,
              cache=cache) as combined:  # fmt: skip
        got, stats = counted(combined, sentences)
        assert combined.read == [24, "attn:22-30", "attn:22-26"]
    assert stats.misses == 0
    np.testing.assert_allclose(got, (_unit(a) + _unit(b) + _unit(c)) / 3, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="within blocks 1..30"):
        fake(fake_model, layer="attn:25-31", cache=False)


def test_the_shell_reads_a_span(fake_model, sts_sentences, tmp_path, capsys):
    from metaeol_edge.faces.cli import main

    src = tmp_path / "s.txt"
    src.write_text("\n".join(sts_sentences[:3]) + "\n", encoding="utf-8")
    common = [*FAKE, "-m", str(fake_model), "-t", "prompteol", "-i", str(src), "-q", "--no-cache"]
    out = tmp_path / "v.npy"
    assert main(["embed", *common, "--layer", "24,attn:22-30", "--combine-layers", "-o", str(out)]) == 0
    with fake(fake_model, templates="prompteol", layer=[24, "attn:22-30"], combine_layers=True, cache=False) as m:
        np.testing.assert_allclose(np.load(out), m.encode(sts_sentences[:3]), rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    assert main(["embed", *common, "--layer", "attn:20-40", "-o", str(out)]) == 2
    assert "within blocks 1..30" in capsys.readouterr().err


def test_a_preset_may_combine_spans_and_its_spans_name_blocks_of_the_file():
    smollm2 = registry.get_spec("smollm2-135m").sha256
    current = presets.get_preset("quality").for_model(smollm2)
    assert current.combine_layers and any(attention_span(x) for x in current.layer)
    for x in current.layer:  # every read names blocks of the file, spelled as reports name it (pages.py)
        assert resolve_layer(x, registry.get_spec("smollm2-135m").n_layer) == x
    base = {"description": "d", "templates": "prompteol", "postprocess": None, "combine_layers": True}
    made = presets._preset("p", base | {"layer": [24, "attn:22-30"]}, 1, {})
    assert made.layer == (24, "attn:22-30")
    with pytest.raises(MetaEOLError, match="preset 'p@1'"):  # one read cannot be combined
        presets._preset("p", base | {"layer": ["attn:22-30"]}, 1, {})


@pytest.mark.slow
def test_llama_cpp_and_pytorch_read_the_same_attention_outputs(smollm2, sts_sentences):
    """On the real file: a span is the mean of its blocks' reads, and PyTorch's ``self_attn`` outputs are
    llama.cpp's ``attn_out`` tensors (the same numbers up to float rounding), so a preset with a span means the
    same on either backend."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sentences = sts_sentences[:2]
    reads = ["attn:22-24", "attn:22-22", "attn:23-23", "attn:24-24", 24]
    with MetaEOL(smollm2, templates="prompteol", layer=reads, cache=False, backend="llama.cpp") as engine:
        span, *blocks, hidden = engine.encode(sentences)
    np.testing.assert_allclose(span, np.mean(blocks, axis=0), rtol=1e-5, atol=1e-6)
    assert cosine(span, hidden).max() < 0.9  # an attention output is not the block's output
    with MetaEOL(smollm2, templates="prompteol", layer=reads, cache=False, backend="pytorch") as torch_model:
        torch_span, *_, torch_hidden = torch_model.encode(sentences)
    assert cosine(torch_span, span).min() > 0.999
    assert cosine(torch_hidden, hidden).min() > 0.999


@pytest.mark.slow
def test_a_span_on_a_graph_without_attn_out_is_refused_saying_so(gemma3_shallow):
    """llama.cpp's Gemma 3 graph norms the attention's output and names no ``attn_out``: a clear error, not a
    wrong vector."""
    with MetaEOL(gemma3_shallow, templates="prompteol", layer="attn:2-3", cache=False, backend="llama.cpp") as m:
        with pytest.raises(ModelError, match="no tensor attn_out-1, attn_out-2 .*pytorch backend reads self_attn"):
            m.encode(["A man plays a guitar."])
