"""The recipe through ``MetaEOL``. The engine's numbers (against the naive official recipe, layers, early
exit) are checked on the real models; the embedder's own logic (shapes, options, refusals, truncation,
the cache key, post-processing) on the fake backend (conftest ``fake_model``)."""

import numpy as np
import pytest
from conftest import cosine, counted, fake

from metaeol_edge import EncodeStats, MetaEOL
from metaeol_edge.errors import InputError, ModelError

EXTRA = [
    "Is this a question?",
    'He said "hello" to me',
    "Ünïcödé text, with emoji 🙂 and numbers 3.14",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def sentences(sts_sentences):
    return sts_sentences[:6] + EXTRA


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["smollm2", "gemma3"])
@pytest.mark.parametrize("set_name", ["metaeol", "prompteol"])
def test_matches_the_naive_official_recipe(request, model_fixture, set_name, recipe_sentences, naive_vectors):
    """Each prompt's vector in one batch of every sentence, and their mean at one sentence a batch. Batch sizes
    in between: test_batch_size_does_not_change_results (the embedder's batching) and
    tests/test_engine.py::test_a_prompts_vector_does_not_depend_on_what_runs_beside_it (the engine's)."""
    path = request.getfixturevalue(model_fixture)
    sentences = recipe_sentences if set_name == "prompteol" else recipe_sentences[1:2]  # 8 prompts a sentence
    expected = naive_vectors(path, set_name, sentences, per_template=True)
    with MetaEOL(path, templates=set_name, cache=False) as model:
        per = model.encode(sentences, batch_size=64, per_template=True)
        got = model.encode(sentences, batch_size=1)
    assert per.shape == expected.shape and got.shape == (len(sentences), model.dim) and got.dtype == np.float32
    assert cosine(per, expected).min() >= 0.999, cosine(per, expected)
    cos = cosine(got, expected.mean(axis=1))
    assert cos.min() >= 0.999, cos


@pytest.fixture(scope="module")
def model(fake_model):
    with fake(fake_model, cache=False) as m:
        yield m


def test_encode_shapes_and_options(model, sentences):
    vecs = model.encode(sentences[:3])
    assert vecs.shape == (3, 576) and vecs.dtype == np.float32
    per = model.encode(sentences[:3], per_template=True)
    assert per.shape == (3, 8, 576)
    assert np.allclose(per.mean(axis=1), vecs, atol=1e-5)
    unit = model.encode(sentences[:3], normalize_embeddings=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    assert np.allclose(unit, vecs / np.linalg.norm(vecs, axis=1, keepdims=True), atol=1e-6)
    one = model.encode(sentences[0])
    assert one.shape == (576,) and np.array_equal(one, vecs[0])
    assert model.get_sentence_embedding_dimension() == 576


def test_batch_size_does_not_change_results(model, sentences):
    one = model.encode(sentences, batch_size=1)
    assert np.array_equal(one, model.encode(sentences, batch_size=7))
    assert np.array_equal(one, model.encode(sentences, batch_size=64))


def test_preprocessing_can_be_switched_off(fake_model):
    with (
        fake(fake_model, templates="prompteol", cache=False) as on,
        fake(fake_model, templates="prompteol", cache=False, preprocess=False) as off,
    ):
        assert np.array_equal(on.encode(["a cat sits."]), off.encode(["a cat sits."]))
        assert not np.array_equal(on.encode(["a cat sits"]), off.encode(["a cat sits"]))


@pytest.mark.parametrize(
    ("bad", "message"),
    [([""], "#1 is empty"), (["ok", "   \t"], "#2 is empty"), (["ok", None], "#2 is a NoneType"), (["a\x00b"], "NUL")],
)
def test_bad_sentences_are_refused(model, bad, message):
    with pytest.raises(InputError, match=message):
        model.encode(bad)


def test_too_long_sentence_is_truncated_with_a_warning(fake_model):
    long = " ".join(["word"] * 400)
    with fake(fake_model, templates="prompteol", cache=False, max_length=64) as m:
        with pytest.warns(UserWarning, match="truncated"):
            vec = m.encode([long])
        assert vec.shape == (1, 576) and np.isfinite(vec).all()
        backend = m.backend
        fitted = m._fit(long, 0, EncodeStats())
        assert len(backend.tokenize(m.templates.templates[0].render(fitted))) <= 64
        assert m.templates.templates[0].render(fitted).endswith('means in one word:"')  # the template is whole


def test_too_long_sentence_is_refused_without_truncation(fake_model):
    with fake(fake_model, templates="prompteol", cache=False, max_length=64, truncate=False) as m:
        with pytest.raises(InputError, match="sentence #5 needs .* over max_length 64"):
            m.encode(["short."] * 4 + [" ".join(["word"] * 400)], batch_size=2)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_bad_batch_size_is_refused(model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["a cat."], batch_size=batch_size)


def test_a_non_finite_vector_is_an_error_not_a_result(model, monkeypatch):
    monkeypatch.setattr(
        model.backend,
        "states",
        lambda prompts, layers, progress=None: np.full((len(layers), len(prompts), 576), np.nan, np.float32),
    )
    with pytest.raises(RuntimeError, match="non-finite values for 1 sentence"):
        model.encode(["a cat sits."])


@pytest.mark.slow
def test_layer_choices_and_one_array_per_layer(smollm2, sts_sentences):
    with MetaEOL(smollm2, "prompteol", layer=0.5, cache=False) as half:
        assert half.layer == 15
        mid = half.encode(sts_sentences[:3])
    with MetaEOL(smollm2, "prompteol", layer=[-1, 15, "-2"], cache=False, early_exit=False) as many:
        assert many.layers == (-1, 15, 29)
        final, mid_again, late = many.encode(sts_sentences[:3])
    with MetaEOL(smollm2, "prompteol", cache=False) as default:
        assert np.array_equal(final, default.encode(sts_sentences[:3]))
    assert np.allclose(mid, mid_again, atol=1e-5) and mid.shape == late.shape == (3, 576)
    assert cosine(mid, final).max() < 0.99  # a different layer is a different vector
    with pytest.raises(ValueError, match="out of range"):
        MetaEOL(smollm2, layer=31)


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["smollm2", "gemma3"])
def test_early_exit_gives_the_full_models_vectors(request, model_fixture, recipe_sentences):
    """PromptEOL: the cut is in the model file, the same for any template set (one prompt a sentence is enough)."""
    path = request.getfixturevalue(model_fixture)
    sentences = recipe_sentences
    with MetaEOL(path, "prompteol", layer=0.5, cache=False, early_exit=False) as full:
        expected = full.encode(sentences)
        assert full.engine.n_layer > full.layer
    with MetaEOL(path, "prompteol", layer=0.5, cache=False) as early:
        got = early.encode(sentences)
        assert early.engine.n_layer == early.layer  # nothing above the layer is loaded
        assert early.engine.model_path.name.endswith(f".blocks{early.layer}.gguf")
    assert cosine(got, expected).min() >= 0.99999
    if model_fixture == "smollm2":  # the README says so: the same bits, not just the same direction
        assert np.array_equal(got, expected)


def test_the_layer_is_part_of_the_cache_key(fake_model, sts_sentences):
    with fake(fake_model, "prompteol") as final:
        a = final.encode(sts_sentences[:4])
    with fake(fake_model, "prompteol", layer=20) as mid:
        b, st = counted(mid, sts_sentences[:4])
        assert (st.hits, st.misses) == (0, 4)
        again, st = counted(mid, sts_sentences[:4])
        assert (st.hits, st.misses) == (4, 0)
    assert np.array_equal(b, again) and cosine(a, b).max() < 0.99


def test_postprocessing_is_fitted_on_a_corpus_stored_and_applied(fake_model, sts_sentences, tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path))  # fits go to the store; keep the user's clean
    corpus, evaluation = sts_sentences[:40], sts_sentences[40:44]
    with fake(fake_model, "prompteol", layer=15) as model:
        with pytest.raises(ModelError, match="fit-postprocess"):
            fake(fake_model, "prompteol", layer=15, postprocess=True).encode(evaluation)
        raw_corpus = model.encode(corpus)
        raw = model.encode(evaluation)
        (path,) = model.fit_postprocess(corpus)
        assert path.is_file() and path.parent == tmp_path / "models" / "postprocess"
    expected = (raw - raw_corpus.mean(0)) / raw_corpus.std(0)
    with fake(fake_model, "prompteol", layer=15, postprocess=True) as fitted:
        got = fitted.encode(evaluation)
        with pytest.raises(ValueError, match="per_template"):
            fitted.encode(evaluation, per_template=True)
    assert np.allclose(got, expected, rtol=1e-4, atol=1e-4)
    with fake(fake_model, "prompteol", layer=16, postprocess=True) as other_layer:
        with pytest.raises(ModelError, match="layer 16"):
            other_layer.encode(evaluation)
