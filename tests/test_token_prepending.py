"""Token Prepending (Fu et al., arXiv 2412.11556): the llama.cpp engine against the PyTorch reference.

The engine rewrites the placeholder's row in llama.cpp's eval callback; the
reference does it with forward pre-hooks on the decoder layers. Both run the F32
level of smollm2-135m, so the two agree to float rounding.
"""

import dataclasses

import pytest
from conftest import cosine
from metaeol_edge.engine import Engine
from metaeol_edge.engine import Prompt as EnginePrompt
from metaeol_edge.layers import FINAL
from metaeol_edge.prompts import preprocess

from metaeol_edge import MetaEOL, TemplateSet, load_templates, registry
from metaeol_edge.backends import LlamaCppBackend, placeholder_row
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.methods import TemplateMethod, TokenPrepending, make_method

SENTENCES = [
    "A man is playing a guitar.",
    "Is the cat on the mat?",
    'He said "hello" twice',
    "Ünïcödé café, naïve façade",
    "The stock market fell sharply today after a long rally in technology shares.",
    "Two dogs run.",
]
LAYERS = [15, FINAL]  # one intermediate block of smollm2's 30, and the final-norm state


def _templates() -> TemplateSet:
    """PromptEOL and a MetaEOL template (an instruction, another wording after the sentence)."""
    key_fact = load_templates("metaeol").templates[6]
    return TemplateSet("tp-test", (load_templates("prompteol").templates[0], key_fact), "test")


def _prompts(method, sentences=SENTENCES):
    return [p for s in sentences for p in method.prompts(preprocess(s))]


@pytest.fixture(scope="module")
def f32_path():
    return registry.quantized("smollm2-135m", "f32")


@pytest.fixture(scope="module")
def engine(f32_path):
    backend = LlamaCppBackend(f32_path, n_threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference(f32_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metaeol_edge.reference import TorchBackend

    backend = TorchBackend(f32_path, device="cpu")
    yield backend
    backend.close()


@pytest.mark.slow
def test_the_placeholder_is_one_token_before_the_sentence_and_outside_the_shared_prefix(smollm2, gemma3):
    method = TokenPrepending(_templates(), start=1, stop=7)
    p = method.prompts(preprocess("A man is playing a guitar."))[0]
    assert p.text == 'This sentence : X "A man is playing a guitar." means in one word:"'  # the authors' "<PST>"
    assert p.prefix == "This sentence :" and len(p.prefix) <= p.rewrite.span[0]
    assert (p.rewrite.start, p.rewrite.stop) == (1, 7)
    for path in (smollm2, gemma3):
        e = Engine(path, n_threads=1, max_length=256)
        try:
            for p in _prompts(method, SENTENCES[:3]):
                row = placeholder_row(e.tokenize, p.text, p.rewrite.span)
                assert e.detokenize(e.tokenize(p.text)[row : row + 1]) == " X"
                assert row >= len(e.tokenize(p.prefix)) - 1  # never in the shared template prefix
        finally:
            e.close()


@pytest.mark.slow
def test_engine_matches_pytorch_with_the_rewrite(engine, reference):
    method = TokenPrepending(_templates(), start=1, stop=7)
    prompts = _prompts(method)
    # Left-padded batches of prompts of different lengths, against one prompt per decode: a placeholder
    # misplaced by the padding would show here.
    ref = reference.states(prompts, LAYERS)
    got = engine.states(prompts, LAYERS)
    plain = engine.states(_prompts(TokenPrepending(_templates(), start=1, stop=1)), LAYERS)
    for layer, r, g, p in zip(LAYERS, ref, got, plain, strict=True):
        cos = cosine(r, g)
        print(f"token prepending, layer {layer}: min cosine engine/PyTorch {cos.min():.7f}")  # pytest -s
        assert cos.min() >= 0.999, (layer, cos.min())
        # The rewrite is what both compute: it moves the vector far more than the two backends differ.
        assert cosine(g, p).min() < 0.9999 and cosine(r, p).min() < 0.9999


@pytest.mark.slow
def test_an_empty_range_is_the_plain_prompt_with_the_placeholder(engine):
    tp = TokenPrepending(_templates(), start=3, stop=3)
    plain_set = TemplateSet("with-x", tuple(t for t, _ in tp._parts), "test")
    plain = TemplateMethod(plain_set)
    assert [p.text for p in _prompts(plain)] == [p.text for p in _prompts(tp)]
    a = engine.states(_prompts(tp), LAYERS)
    b = engine.states(_prompts(plain), LAYERS)  # another shared prefix: the template's, up to the quote
    assert cosine(a, b).min() >= 0.99999


@pytest.mark.slow
def test_prefix_sharing_changes_no_rewritten_vector(engine):
    prompts = _prompts(TokenPrepending(_templates(), start=1, stop=7), SENTENCES[:3])
    shared = engine.states(prompts, [FINAL])
    whole = engine.states([dataclasses.replace(p, prefix="") for p in prompts], [FINAL])
    assert cosine(shared, whole).min() >= 0.99999
    # A prefix that covers the placeholder is cut before it by the engine: the same vectors.
    covering = engine.states([dataclasses.replace(p, prefix=p.text) for p in prompts], [FINAL])
    assert cosine(shared, covering).min() >= 0.99999


@pytest.mark.slow
def test_early_exit_and_layer_reads_keep_the_rewrite(smollm2):
    method = TokenPrepending(load_templates("prompteol"), start=1, stop=7)
    with MetaEOL(smollm2, "prompteol", method=method, layer=12, cache=False, n_threads=1) as cut:
        a = cut.encode(SENTENCES[:3])
        assert cut._exit_blocks == 12
    with MetaEOL(smollm2, "prompteol", method=method, layer=[12, -1], cache=False, n_threads=1) as whole:
        b, final = whole.encode(SENTENCES[:3])
    with MetaEOL(smollm2, "prompteol", method="tp", cache=False, n_threads=1) as default:
        assert default.method.cache_name == "tp/1:1-4"
        assert cosine(default.encode(SENTENCES[:3]), final).min() < 0.9999  # another range, another vector
    assert cosine(a, b).min() >= 0.9999


def test_cache_keys_of_tp_are_apart_from_eol_and_from_other_ranges(fake_model, tmp_path):
    keys = {}
    for name, method in [
        ("eol", None),
        ("tp", "tp"),
        ("tp2", TokenPrepending(load_templates("metaeol"), start=1, stop=2)),
        ("tp-x", TokenPrepending(load_templates("metaeol"), start=1, stop=2, placeholder=" *")),
    ]:
        with MetaEOL(fake_model, "metaeol", method=method, cache=tmp_path / "c.sqlite", backend="fake") as m:
            keys[name] = {k.digest() for k in m.cache_keys("A cat sleeps.")}
    assert all(len(v) == 8 for v in keys.values())
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not keys[a] & keys[b], (a, b)
    assert make_method("tp", load_templates("prompteol")).cache_name == "tp/1:1-4"
    assert make_method(None, load_templates("prompteol")).cache_name == ""  # the paper's keys are unchanged


@pytest.mark.parametrize(("start", "stop"), [(3, 2), (0, 4), (-1, 2), (1.0, 4), (True, 4)])
def test_impossible_ranges_are_refused_at_construction(start, stop):
    with pytest.raises(MetaEOLError, match="token prepending"):
        TokenPrepending(load_templates("prompteol"), start=start, stop=stop)


def test_a_range_past_the_model_is_refused_before_anything_runs(fake_model):
    ts = load_templates("prompteol")  # the fake model has smollm2's 30 blocks
    with pytest.raises(MetaEOLError, match="stop 31 is over the model's 30 blocks"):
        MetaEOL(fake_model, ts, method=TokenPrepending(ts, start=1, stop=31), cache=False, backend="fake")
    with MetaEOL(fake_model, ts, method=TokenPrepending(ts, start=1, stop=30), cache=False, backend="fake") as m:
        assert m.encode(["A cat sleeps."]).shape == (1, 576)  # the last block's input is rewritten, and runs


@pytest.mark.slow
def test_what_cannot_rewrite_says_so(smollm2):
    from metaeol_edge.naive import NaiveBackend

    prompts = _prompts(TokenPrepending(load_templates("prompteol")), SENTENCES[:1])
    naive = NaiveBackend(smollm2, n_ctx=256, n_threads=1)
    try:
        with pytest.raises(ValueError, match="naive recipe .* cannot rewrite"):
            naive.states(prompts, [FINAL])
    finally:
        naive.close()
    e = Engine(smollm2, n_threads=1, n_batch=32, max_length=256)
    try:
        text = prompts[0].text
        tokens = e.tokenize(text)
        row = placeholder_row(e.tokenize, text, prompts[0].rewrite.span)
        e.embed([EnginePrompt(tokens, rewrite=(row, 1, 4))])  # fits one ubatch
        long = text.replace("A man", "A man " + "and a dog " * 20)
        tokens = e.tokenize(long)
        with pytest.raises(ValueError, match="in one ubatch"):
            e.embed([EnginePrompt(tokens, rewrite=(row, 1, 4))])
        with pytest.raises(ValueError, match="before the last token"):
            e.embed([EnginePrompt(tokens[:5], rewrite=(4, 1, 4))])
        e.mode = "packed"
        with pytest.raises(ValueError, match="one-at-a-time"):
            e.embed([EnginePrompt(tokens[:8], rewrite=(row, 1, 4))])
    finally:
        e.close()


def test_the_command_line_takes_the_method_and_its_layers(tmp_path):
    from conftest import FAKE, run_cli
    from metaeol_edge.cli import _method, _parser

    parser = _parser()
    args = parser.parse_args(["embed", "-i", "x.txt", "-o", "y.npy", "--method", "tp", "--tp-layers", "2:5"])
    method = _method(args)
    assert isinstance(method, TokenPrepending) and (method.start, method.stop) == (2, 5)
    assert repr(method) == repr(_method(args))  # a bulk job's identity holds it
    # The command's plumbing: the fake backend (placeholder checks and all); the rewrite's numbers are above.
    bad = run_cli("similarity", *FAKE, "a", "b", "--method", "tp", "--tp-layers", "5:2", "--no-cache")
    assert bad.returncode == 2 and "1 <= start <= stop" in bad.stderr and "Traceback" not in bad.stderr
    ok = run_cli("similarity", *FAKE, "A cat sleeps.", "A kitten naps.", "--method", "tp", "--no-cache")
    assert ok.returncode == 0, ok.stderr
