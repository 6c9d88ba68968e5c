"""The restructure moved no vector: golden vectors written by the 0.1 code (tests/golden/make_golden.py,
run on the commit before it) are reproduced bit for bit."""

import json
from pathlib import Path

import numpy as np
import pytest

from metaeol_edge import MetaEOL, registry

GOLDEN = Path(__file__).parent / "golden"
SENTENCES = json.loads((GOLDEN / "sentences.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "vectors.npz") as data:
        return {k: data[k] for k in data.files}


def _cases():
    for model in ("smollm2-135m", "gemma3-270m"):
        n = registry.get_spec(model).n_layer
        for method in ("metaeol", "prompteol"):
            if model == "smollm2-135m" and method == "metaeol":
                # Its middle and last layers in one pass (the longest case, run once, not twice). The golden
                # middle layer was written with early exit; on smollm2-135m that gives the full pass's bits
                # (tests/test_embedder.py::test_early_exit_gives_the_full_models_vectors), so this also checks it.
                yield model, method, (1,)
                yield model, method, (n // 2, -1)
                continue
            for layer in (1, n // 2, -1):
                yield model, method, (layer,)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,method,layers", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{'+'.join(map(str, c[2]))}") for c in _cases()]
)
def test_golden_vectors_reproduced_bit_for_bit(golden, model, method, layers):
    path = registry.resolve_model(model)
    with MetaEOL(path, templates=method, layer=list(layers) if len(layers) > 1 else layers[0], cache=False) as m:
        got = m.encode(SENTENCES, show_progress_bar=False)
    for layer, vectors in zip(layers, got if len(layers) > 1 else [got], strict=True):
        expected = golden[f"{model}|{method}|{layer}"]
        assert vectors.dtype == np.float32 and vectors.shape == expected.shape
        assert vectors.tobytes() == expected.tobytes(), (model, method, layer)


@pytest.mark.slow
def test_golden_vectors_through_the_cache_and_streaming(golden, tmp_path):
    """Cold through the cache, warm from it, and streamed one by one: the same bytes."""
    expected = golden["smollm2-135m|prompteol|-1"]
    with MetaEOL("smollm2-135m", templates="prompteol", cache=tmp_path / "c.sqlite3") as m:
        cold = m.encode(SENTENCES, batch_size=3)
        warm = m.encode(SENTENCES, batch_size=7)
        streamed = np.stack(list(m.encode_iter(iter(SENTENCES), batch_size=4)))
    for got in (cold, warm, streamed):
        assert got.tobytes() == expected.tobytes()


@pytest.fixture(scope="module")
def golden_f16():
    with np.load(GOLDEN / "vectors_f16.npz") as data:
        return {k: data[k] for k in data.files}


# Six of the twenty sentences (quotes, outer spaces, emoji, one word, CJK, tabs): rows do not depend on the
# batch (the cache/streaming test above), so these rows of the golden file are checked bit for bit; all
# twenty are checked on the stored level by test_golden_vectors_reproduced_bit_for_bit.
F16_ROWS = [3, 4, 5, 7, 10, 18]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["metaeol", "prompteol"])
@pytest.mark.parametrize("layer", [1, 15, -1])
def test_the_derived_f16_level_reproduces_its_own_golden_vectors(golden_f16, method, layer):
    """smollm2-135m's default level here (Q4_1 -> F16, tests/test_quantization.py) has its own golden file,
    written once by tests/golden/make_golden.py from the store's derived copy."""
    expected = golden_f16[f"smollm2-135m|{method}|{layer}"][F16_ROWS]
    with MetaEOL("smollm2-135m", templates=method, layer=layer, cache=False, level="f16") as m:
        assert m.level == "f16" and m.model_path.name.endswith(".f16.gguf")
        got = m.encode([SENTENCES[i] for i in F16_ROWS], show_progress_bar=False)
    assert got.tobytes() == expected.tobytes()
