import numpy as np
import pytest

from metaeol_edge.engine import Engine, LogFilter, Prompt, use_extra_bufts
from metaeol_edge.layers import FINAL, resolve_layer
from metaeol_edge.prompts import load_templates, preprocess

AMX_BUILD = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
PLAIN_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | REPACK = 1 |"


def test_extra_buffers_are_off_unless_asked(monkeypatch):
    monkeypatch.delenv("METAEOL_EXTRA_BUFTS", raising=False)
    assert use_extra_bufts(PLAIN_BUILD, os_grants_amx=lambda: True) is False
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: True) is False


def test_asked_for_extra_buffers_still_avoid_amx_the_os_forbids(monkeypatch):
    monkeypatch.setenv("METAEOL_EXTRA_BUFTS", "1")
    assert use_extra_bufts(PLAIN_BUILD, os_grants_amx=lambda: False) is True
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: False) is False
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: True) is True


def test_every_load_path_uses_the_safe_parameters(monkeypatch):
    import llama_cpp.llama as high

    from metaeol_edge.engine import model_params, safe_model_params

    monkeypatch.delenv("METAEOL_EXTRA_BUFTS", raising=False)
    assert model_params(0).use_extra_bufts is False
    with safe_model_params():
        assert high.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert high.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored


@pytest.fixture(scope="module")
def engine(smollm2):
    e = Engine(smollm2)
    yield e
    e.close()


def _prompts(engine, sentences, set_name="metaeol"):
    ts = load_templates(set_name)
    return [
        Prompt(engine.tokenize(t.render(preprocess(s))), engine.tokenize(t.prefix))
        for s in sentences
        for t in ts.templates
    ]


@pytest.mark.slow
def test_a_prompts_vector_does_not_depend_on_what_runs_beside_it(engine, sts_sentences):
    prompts = _prompts(engine, sts_sentences[:4])
    full = engine.embed(prompts)
    assert np.array_equal(engine.embed(prompts[5:19]), full[5:19])
    assert np.array_equal(engine.embed(prompts[::-1])[::-1], full)
    assert np.array_equal(engine.embed([prompts[7]])[0], full[7])


@pytest.mark.slow
def test_prefix_sharing_changes_nothing(engine, sts_sentences):
    shared = _prompts(engine, sts_sentences[10:12])
    alone = [Prompt(p.tokens) for p in shared]
    a, b = engine.embed(shared), engine.embed(alone)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
    assert engine.embed(shared).shape == (16, 576)


@pytest.mark.slow
def test_only_new_tokens_are_decoded(engine, sts_sentences):
    t = load_templates("metaeol").templates[0]
    prompts = [Prompt(engine.tokenize(t.render(preprocess(s))), engine.tokenize(t.prefix)) for s in sts_sentences[:8]]
    engine.embed(prompts[:1])  # the template's prefix is now in the cache
    before = engine.tokens_decoded
    engine.embed(prompts)
    spent = engine.tokens_decoded - before
    total = sum(len(p.tokens) for p in prompts)
    common = [min(len(p.prefix), len(p.tokens) - 1) for p in prompts]
    assert all(p.tokens[:n] == p.prefix[:n] for p, n in zip(prompts, common, strict=True))
    assert spent == total - sum(common)
    assert spent < 0.5 * total  # the instruction is most of each prompt


@pytest.mark.slow
def test_long_prompts_are_decoded_in_chunks(smollm2):
    e = Engine(smollm2, max_length=1500, n_batch=256)
    try:
        text = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)
        t = load_templates("prompteol").templates[0]
        tokens = e.tokenize(t.render(text))
        assert len(tokens) > 3 * 256
        chunked = e.embed([Prompt(tokens, e.tokenize(t.prefix))])[0]
        whole = e.embed([Prompt(tokens)])[0]
        cos = float(chunked @ whole / np.linalg.norm(chunked) / np.linalg.norm(whole))
        assert cos >= 0.999
        with pytest.raises(ValueError, match="exceeds max_length"):
            e.embed([Prompt(tokens * 2)])
    finally:
        e.close()


def test_layer_choices_resolve_to_blocks_or_final():
    assert resolve_layer(-1, 30) == FINAL
    assert [resolve_layer(k, 30) for k in (1, 15, 30)] == [1, 15, 30]
    assert resolve_layer(-2, 30) == 29  # as hidden_states[-2]
    assert resolve_layer(-30, 30) == 1
    assert resolve_layer(0.8, 30) == 24
    assert resolve_layer("0.5", 18) == 9
    assert resolve_layer("12", 30) == 12
    assert resolve_layer(1.0, 30) == 30
    assert resolve_layer(0.01, 30) == 1


@pytest.mark.parametrize("bad", [0, 31, -31, 1.5, -0.5, "x", "", True, None])
def test_impossible_layers_are_refused_with_the_range(bad):
    with pytest.raises(ValueError, match="layer"):
        resolve_layer(bad, 30)


@pytest.mark.slow
def test_several_layers_are_read_in_one_pass(engine, sts_sentences):
    prompts = _prompts(engine, sts_sentences[:2])
    many = engine.embed(prompts, layers=[FINAL, 15, 30, 1])
    assert many.shape == (4, 16, 576)
    assert np.array_equal(many[0], engine.embed(prompts))
    assert np.array_equal(many[1], engine.embed(prompts, layers=[15])[0])
    assert np.array_equal(many[3], engine.embed(prompts, layers=[1])[0])
    # Block 30 is the last block's output before the final norm: same direction up to
    # the norm's per-dimension weight, so not the final vector.
    assert not np.allclose(many[2], many[0])
    with pytest.raises(ValueError, match="block number"):
        engine.embed(prompts, layers=[31])


def test_llama_cpp_errors_are_shown_and_warnings_are_not():
    quiet = LogFilter(verbose=False)
    assert [quiet(level) for level in (2, 3, 4, 5, 3, 5)] == [False, False, True, True, False, False]
    assert all(LogFilter(verbose=True)(level) for level in (1, 2, 3, 4, 5))
