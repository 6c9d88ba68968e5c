"""The seams: one object from several threads, methods registered from outside, streaming, stats.

The embedder's side of each seam runs on the fake backend (conftest ``fake_model``); the engine's side
(threads on one llama.cpp context, pooled reads against llama.cpp's own per-token states, pools across
decodes) on smollm2."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import cosine, counted, fake
from metaeol_edge.engine import init_backend, safe_model_params
from metaeol_edge.prompts import load_templates

from metaeol_edge import EncodeStats, MetaEOL, Prompt, TemplateMethod, method_names, register_method
from metaeol_edge.errors import MetaEOLError
from metaeol_edge.methods import make_method, unregister_method

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is making music on a string instrument.",
    "A chef is slicing vegetables in a kitchen.",
    "The stock market fell sharply today.",
    "Two dogs run through a field.",
    "Is it going to rain tomorrow?",
    'She said "no" twice',
    "A child reads a book under a tree.",
    "The train to Paris leaves at noon.",
    "Quantum computers use qubits.",
    "He forgot his umbrella at the station.",
    "Fresh bread smells wonderful.",
]


@pytest.mark.parametrize(
    ("backend", "cache"),
    [
        pytest.param("llama.cpp", False, marks=pytest.mark.slow, id="engine"),  # one llama.cpp context, 4 threads
        pytest.param("fake", False, id="fake"),
        pytest.param("fake", True, id="fake-cache"),  # the cache's connection per thread
    ],
)
def test_four_threads_on_one_object_give_the_single_threaded_vectors(request, tmp_path, backend, cache):
    """Overlapping inputs from 4 threads at once: no error, no hang, the same bytes as one thread."""
    path = request.getfixturevalue("smollm2" if backend == "llama.cpp" else "fake_model")
    # Each thread gets an overlapping window of the sentences, in its own order.
    inputs = [SENTENCES[k : k + 8] for k in (0, 2, 4)] + [SENTENCES[::-1][:8]]
    with MetaEOL(path, "prompteol", cache=False, backend=backend) as single:
        expected = [single.encode(x) for x in inputs]
    results: list[np.ndarray | None] = [None] * 4
    errors: list[BaseException] = []
    start = threading.Barrier(4)
    with MetaEOL(path, "prompteol", cache=tmp_path / "c.sqlite3" if cache else False, backend=backend) as shared:

        def work(k: int) -> None:
            try:
                start.wait(timeout=60)
                results[k] = shared.encode(inputs[k], batch_size=3)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
        for got, want in zip(results, expected, strict=True):
            assert got is not None and got.tobytes() == want.tobytes()
        if cache:
            keys = [k for s in SENTENCES for k in shared.cache_keys(s)]
            assert len(shared.cache.get_many(keys)) == len(keys) == len(SENTENCES)  # every (sentence, template)


class SentenceMean(TemplateMethod):
    """A method that is not the paper's read: the mean of the sentence's own tokens in each filled template."""

    cache_name = "test-sentence-mean/1"

    def prompts(self, sentence: str) -> list[Prompt]:
        out = []
        for t in self.templates.templates:
            text = t.render(sentence)
            start = text.index(sentence)
            out.append(Prompt(text, key=t.text, label=t.task, prefix=t.prefix, pool=(start, start + len(sentence))))
        return out


@pytest.fixture
def sentence_mean():
    register_method("test-sentence-mean", SentenceMean)
    yield "test-sentence-mean"
    unregister_method("test-sentence-mean")


def _independent_sentence_mean(path, sentences: list[str]) -> np.ndarray:
    """llama-cpp-python's own per-token embeddings (pooling NONE), averaged over the sentence's tokens."""
    import llama_cpp

    init_backend(False)
    template = load_templates("prompteol").templates[0]
    with safe_model_params():
        llm = llama_cpp.Llama(
            str(path),
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
            n_ctx=512,
            n_batch=512,
            n_ubatch=512,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            verbose=False,
        )
    try:
        out = []
        for s in sentences:
            text = template.render(s)
            a = text.index(s)
            start = len(llm.tokenize(text[:a].encode()))
            stop = len(llm.tokenize(text[: a + len(s)].encode()))
            rows = np.asarray(llm.embed(text), dtype=np.float64)
            assert len(rows) == len(llm.tokenize(text.encode()))
            out.append(rows[start:stop].mean(0))
        return np.asarray(out)
    finally:
        llm.close()


def test_a_registered_non_template_method_runs_through_encode_and_the_cache(fake_model, tmp_path, sentence_mean):
    assert sentence_mean in method_names()
    sentences = SENTENCES[:5]
    cache = tmp_path / "c.sqlite3"
    with fake(fake_model, "prompteol", cache=cache, preprocess=False) as eol:
        paper = eol.encode(sentences)
    with fake(fake_model, "prompteol", method=sentence_mean, cache=cache, preprocess=False) as mine:
        cold, st = counted(mine, sentences)
        assert (st.hits, st.misses) == (0, 5)  # PromptEOL's entries for the same prompts are not its own
        warm, st = counted(mine, sentences)
        assert (st.hits, st.misses) == (5, 0)
    assert warm.tobytes() == cold.tobytes()
    assert cosine(cold, paper).max() < 0.99  # another read of the same prompt is another vector
    with fake(fake_model, "prompteol", cache=cache, preprocess=False) as eol:
        again, st = counted(eol, sentences)
        assert st.hits == 5 and again.tobytes() == paper.tobytes()  # and PromptEOL still gets its own


@pytest.mark.slow
def test_a_registered_pooled_method_reads_what_llama_cpp_gives_each_token(smollm2, sentence_mean):
    """The engine's side of the method seam: its pooled read equals llama.cpp's own per-token states averaged."""
    sentences = SENTENCES[:5]
    with MetaEOL(smollm2, "prompteol", method=sentence_mean, cache=False, preprocess=False) as mine:
        got = mine.encode(sentences)
    expected = _independent_sentence_mean(smollm2, sentences)
    assert cosine(got.astype(np.float64), expected).min() >= 0.999


@pytest.mark.slow
def test_a_method_reads_any_layer_and_pools_across_decodes(smollm2, sentence_mean):
    """A pooled span longer than one decode (n_batch) is read in pieces and still averages every row."""
    long = " ".join(f"word{i}" for i in range(60))
    with MetaEOL(smollm2, "prompteol", method=sentence_mean, cache=False, layer=[10, -1], early_exit=False) as m:
        mid, final = m.encode([long, SENTENCES[0]])
        m.engine.n_batch = 64  # force the long prompt into several decodes
        mid2, final2 = m.encode([long, SENTENCES[0]])
    assert cosine(mid, mid2).min() >= 0.9999 and cosine(final, final2).min() >= 0.9999


def test_a_method_with_the_papers_cache_name_is_refused():
    class Sneaky(TemplateMethod):
        pass

    with pytest.raises(MetaEOLError, match="cache_name"):
        make_method(Sneaky(load_templates("prompteol")), load_templates("prompteol"))
    with pytest.raises(MetaEOLError, match="unknown method 'nope'"):
        make_method("nope", load_templates("prompteol"))
    with pytest.raises(ValueError, match="already registered"):
        register_method("eol", SentenceMean)


def test_encode_iter_streams_with_memory_bounded_by_the_batch(fake_model):
    pulled = []

    def source():
        for s in SENTENCES:
            pulled.append(s)
            yield s

    with fake(fake_model, "prompteol", cache=False) as m:
        expected = m.encode(SENTENCES)
        stream = m.encode_iter(source(), batch_size=4)
        first = next(stream)
        assert len(pulled) == 4  # one batch read, not the whole input
        rest = list(stream)
    assert np.stack([first, *rest]).tobytes() == expected.tobytes()


def test_statistics_and_truncations_go_to_the_caller(fake_model, tmp_path):
    long = " ".join(["word"] * 400)
    with fake(fake_model, "prompteol", cache=tmp_path / "c.sqlite3", max_length=64) as m:
        with pytest.warns(UserWarning, match="truncated"):
            _, st = counted(m, ["short one.", long])
        assert (st.sentences, st.hits, st.misses) == (2, 0, 2)
        assert len(st.truncated) == 1 and st.truncated[0].index == 1 and st.truncated[0].tokens == 401
        assert not hasattr(m, "last_hits")
        total = EncodeStats()
        m.encode(["short one."], stats=total)
        m.encode(["another."], stats=total)
        assert (total.sentences, total.hits, total.misses) == (2, 1, 1)


@pytest.mark.parametrize("module", ["metaeol_edge", "metaeol_edge.cli"])
def test_python_dash_m_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "embed" in r.stdout and "Traceback" not in r.stderr
