import numpy as np
import pytest

from metaeol_edge import MetaEOL
from metaeol_edge.errors import InputError
from metaeol_edge.naive import NaiveRecipe
from metaeol_edge.prompts import load_templates

EXTRA = [
    "Is this a question?",
    'He said "hello" to me',
    "Ünïcödé text, with emoji 🙂 and numbers 3.14",
    "  leading and trailing spaces  ",
]


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def sentences(sts_sentences):
    return sts_sentences[:6] + EXTRA


@pytest.mark.parametrize("model_fixture", ["smollm2", "gemma3"])
@pytest.mark.parametrize("set_name", ["metaeol", "prompteol"])
def test_matches_the_naive_official_recipe(request, model_fixture, set_name, sentences):
    path = request.getfixturevalue(model_fixture)
    templates = load_templates(set_name)
    naive = NaiveRecipe(path)
    expected = naive.encode(sentences, templates)
    naive.close()
    with MetaEOL(path, templates=set_name, cache=False) as model:
        got = model.encode(sentences, batch_size=3)
    assert got.shape == expected.shape and got.dtype == np.float32
    cos = _cos(got, expected)
    assert cos.min() >= 0.999, cos


@pytest.fixture(scope="module")
def model(smollm2):
    with MetaEOL(smollm2, cache=False) as m:
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
    assert np.array_equal(model.encode(sentences, batch_size=1), model.encode(sentences, batch_size=7))


def test_preprocessing_can_be_switched_off(smollm2):
    with (
        MetaEOL(smollm2, templates="prompteol", cache=False) as on,
        MetaEOL(smollm2, templates="prompteol", cache=False, preprocess=False) as off,
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


def test_too_long_sentence_is_truncated_with_a_warning(smollm2):
    long = " ".join(["word"] * 400)
    with MetaEOL(smollm2, templates="prompteol", cache=False, max_length=64) as m:
        with pytest.warns(UserWarning, match="truncated"):
            vec = m.encode([long])
        assert vec.shape == (1, 576) and np.isfinite(vec).all()
        engine = m.engine
        fitted = m._fit(long, 0)
        assert len(engine.tokenize(m.templates.templates[0].render(fitted))) <= 64
        assert m.templates.templates[0].render(fitted).endswith('means in one word:"')  # the template is whole


def test_too_long_sentence_is_refused_without_truncation(smollm2):
    with MetaEOL(smollm2, templates="prompteol", cache=False, max_length=64, truncate=False) as m:
        with pytest.raises(InputError, match="sentence #5 needs .* over max_length 64"):
            m.encode(["short."] * 4 + [" ".join(["word"] * 400)], batch_size=2)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_bad_batch_size_is_refused(model, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["a cat."], batch_size=batch_size)


def test_a_non_finite_vector_is_an_error_not_a_result(model, monkeypatch):
    engine = model.engine
    monkeypatch.setattr(engine, "embed", lambda prompts: np.full((len(prompts), 576), np.nan, np.float32))
    with pytest.raises(RuntimeError, match="non-finite values for 1 sentence"):
        model.encode(["a cat sits."])
