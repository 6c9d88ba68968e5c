"""The fake backend honours the Backend contract, so the logic tests that run on it test real behaviour."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import FAKE, counted, fake
from metaeol_edge.backends_fake import BOS, FakeBackend, write_model
from metaeol_edge.cli import main
from metaeol_edge.layers import FINAL
from metaeol_edge.modelfile import inspect_gguf

from metaeol_edge import MetaEOL
from metaeol_edge.backends import backend_names, open_backend, spec_for
from metaeol_edge.errors import ModelError
from metaeol_edge.methods import Prompt, Rewrite


@pytest.fixture
def backend(fake_model):
    return FakeBackend(fake_model)


def _p(text: str, **kw) -> Prompt:
    return Prompt(text, key=text, **kw)


def test_registered_by_name_with_a_cache_tag_of_its_own(fake_model):
    assert "fake" in backend_names()
    spec = spec_for("fake")
    assert spec.cache_tag({}) == "fake" and spec.cache_tag({"seed": 3}) == "fake-seed3"
    assert isinstance(open_backend("fake", fake_model), FakeBackend)


def test_the_fake_model_file_has_smollm2s_header_and_is_tiny(fake_model):
    info = inspect_gguf(fake_model)
    assert (info.architecture, info.n_layer, info.n_embd, info.n_ctx_train) == ("llama", 30, 576, 8192)
    assert info.quantization == "Q4_1" and fake_model.stat().st_size < 10_000


def test_tokens_merge_like_a_bpe_and_detokenize_to_the_text(backend):
    text = '  He said "hello", Ünïcödé 🙂 3.14  '
    tokens = backend.tokenize(text)
    assert tokens[0] == BOS and backend.tokenize(text, add_special=False) == tokens[1:]
    assert backend.detokenize(tokens) == text
    assert len(backend.tokenize("A cat sleeps.", add_special=False)) == 4  # "A", " cat", " sleeps", "."
    assert backend.tokenize(" cat")[1:] == FakeBackend(backend.model_path).tokenize(" cat")[1:]  # stable ids
    with pytest.raises(ValueError, match="not made by this fake backend"):
        backend.detokenize([12345])


def test_states_shape_determinism_and_differences(backend):
    prompts = [_p("A cat sleeps."), _p("A dog barks."), _p("A cat sleeps.")]
    layers = [FINAL, 15, 1]
    done = []
    got = backend.states(prompts, layers, progress=done.append)
    assert got.shape == (3, 3, 576) and got.dtype == np.float32 and np.isfinite(got).all()
    assert sum(done) == 3  # one prompt's worth of progress per prompt, as the engine reports
    assert np.array_equal(got[:, 0], got[:, 2])  # same prompt, same bits
    assert not np.allclose(got[:, 0], got[:, 1])  # another prompt, another vector
    assert not np.allclose(got[0], got[1]) and not np.allclose(got[1], got[2])  # every layer its own
    # Alone or in a batch, in another backend object: the same bits (no batch effects, no hidden state).
    again = FakeBackend(backend.model_path).states(prompts[1:2], [15])
    assert np.array_equal(again[0, 0], got[1, 1])
    # Another seed is another "model".
    assert not np.allclose(FakeBackend(backend.model_path, seed=1).states(prompts[:1], [15])[0, 0], got[1, 0])


def test_states_are_causal_and_shared_words_make_similar_vectors(backend):
    text = "A man plays a guitar. Afterwards"
    span_end = len("A man plays a guitar.")
    pooled_prefix = backend.states([_p(text, pool=(span_end - 1, span_end))], [FINAL])[0, 0]
    alone = backend.states([_p(text[:span_end])], [FINAL])[0, 0]
    assert np.allclose(pooled_prefix, alone, atol=1e-6)  # what follows a token never changes its state
    a, b, c = backend.states([_p("A man plays a guitar."), _p("A man plays the guitar."), _p("Stocks fell.")], [FINAL])[
        0
    ]
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    assert cos(a, b) > cos(a, c) + 0.2


def test_pool_spans_and_rewrites_follow_the_engines_rules(backend):
    text = "Sentence : X A cat sleeps ."
    whole = backend.states([_p(text, pool=(0, len(text)))], [FINAL])[0, 0]
    last = backend.states([_p(text)], [FINAL])[0, 0]
    assert not np.allclose(whole, last)
    with pytest.raises(ValueError, match="outside a prompt"):
        backend.states([_p(text, pool=(0, 999))], [FINAL])
    x = text.index(" X")
    rewritten = backend.states([_p(text, rewrite=Rewrite((x, x + 2), 1, 4))], [FINAL, 1, 2])[:, 0]
    plain = backend.states([_p(text)], [FINAL, 1, 2])[:, 0]
    assert not np.allclose(rewritten[0], plain[0]) and not np.allclose(rewritten[2], plain[2])
    assert np.array_equal(rewritten[1], plain[1])  # block 1's output is computed before block 1's input is rewritten
    nothing = backend.states([_p(text, rewrite=Rewrite((x, x + 2), 2, 2))], [FINAL])[0, 0]
    assert np.array_equal(nothing, last)  # start == stop rewrites nothing
    with pytest.raises(ValueError, match="not one token of its own"):
        backend.states([_p("Sentence : XA cat .", rewrite=Rewrite((10, 12), 1, 4))], [FINAL])


def test_bad_layers_and_long_prompts_are_refused(fake_model):
    with pytest.raises(ValueError, match="not FINAL or a block number 1..30"):
        FakeBackend(fake_model).states([_p("a")], [31])
    with pytest.raises(ValueError, match="exceeds max_length 16"):
        FakeBackend(fake_model, max_length=16).states([_p(" ".join(["w"] * 20))], [FINAL])
    with pytest.raises(ValueError, match="seed must be an integer"):
        FakeBackend(fake_model, seed="1")  # type: ignore[arg-type]


def test_a_bad_model_file_is_refused_as_for_any_backend(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    with pytest.raises(ModelError, match="not a GGUF model file"):
        MetaEOL(bad, backend="fake")
    small = write_model(tmp_path / "small.gguf", n_layer=4, n_embd=16, n_ctx=512)
    with fake(small, "prompteol", cache=False) as m:
        assert m.encode(["A cat."]).shape == (1, 16)


def test_metaeol_runs_the_recipe_on_it_and_caches_apart_from_the_engine(fake_model, tmp_path):
    cache = tmp_path / "c.sqlite3"
    with fake(fake_model, cache=cache) as m:
        per, st = counted(m, ["A cat sleeps.", "The market fell."], per_template=True)
        assert per.shape == (2, 8, 576) and (st.hits, st.misses) == (0, 16)
        assert m.backend.calls == 1
        _, st = counted(m, ["A cat sleeps."])
        assert (st.hits, st.misses) == (8, 0) and m.backend.calls == 1  # served by the cache: no backend call
        assert m._vector_source().endswith("fake")
    with MetaEOL(fake_model, cache=cache, backend="fake", backend_options={"seed": 2}) as other:
        _, st = counted(other, ["A cat sleeps."])
        assert st.hits == 0  # another seed's vectors are not this one's


def test_the_cli_and_a_fresh_process_give_the_same_bits(fake_model, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("A cat sleeps.\nThe market fell.\n")
    out = tmp_path / "out.npy"
    assert main(["embed", *FAKE, "-m", str(fake_model), "-t", "prompteol", "-q", "-i", str(src), "-o", str(out)]) == 0
    code = (
        "import sys, numpy as np; from metaeol_edge import MetaEOL;"
        "m = MetaEOL(sys.argv[1], 'prompteol', backend='fake', cache=False);"
        "np.save(sys.argv[2], m.encode(['A cat sleeps.', 'The market fell.']))"
    )
    other = tmp_path / "other.npy"
    r = subprocess.run([sys.executable, "-c", code, str(fake_model), str(other)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(out), np.load(other))
