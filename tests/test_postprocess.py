import numpy as np
import pytest

from metaeol_edge import postprocess as pp
from metaeol_edge.errors import ModelError


@pytest.fixture
def skewed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x[:, 0] = x[:, 0] * 5 + 100  # a dimension with a huge mean, as in middle layers
    x[:, 1] += 0.9 * x[:, 2]  # correlated dimensions
    return x


def test_standardize_centres_and_scales_each_dimension(skewed):
    fit = pp.fit(skewed, "standardize")
    out = fit.apply(skewed)
    assert out.dtype == np.float32
    assert np.allclose(out.mean(0), 0, atol=1e-4) and np.allclose(out.std(0), 1, atol=1e-3)
    assert fit.n_fit == 400


def test_whiten_also_decorrelates(skewed):
    out = pp.fit(skewed, "whiten").apply(skewed)
    assert np.allclose(np.cov(out, rowvar=False), np.eye(8), atol=1e-3)


def test_bad_fits_are_refused(skewed):
    with pytest.raises(ValueError, match="more than 8 sentences"):
        pp.fit(skewed[:8], "whiten")
    with pytest.raises(ValueError, match="kind"):
        pp.fit(skewed, "pca")
    with pytest.raises(ValueError, match="non-finite"):
        pp.fit(np.full((3, 2), np.nan), "standardize")
    with pytest.raises(ValueError, match="dimension 8"):
        pp.fit(skewed).apply(np.zeros((2, 9), np.float32))


def test_a_fit_survives_saving_and_a_damaged_file_is_a_clear_error(skewed, tmp_path):
    fit = pp.fit(skewed, "whiten")
    path = tmp_path / "fit.npz"
    pp.save(fit, path, {"layer": 3})
    back = pp.load(path)
    assert back.kind == "whiten" and np.array_equal(back.apply(skewed), fit.apply(skewed))
    path.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="fit it again"):
        pp.load(path)


def test_center_only_subtracts_the_mean(skewed):
    out = pp.fit(skewed, "center").apply(skewed)
    assert np.allclose(out, skewed - skewed.mean(0), atol=1e-4)


def test_whiten_k_keeps_the_top_directions_as_pca_whitening_does(skewed):
    decomposition = pytest.importorskip("sklearn.decomposition")
    out = pp.fit(skewed, "whiten:3").apply(skewed)
    assert out.shape == (400, 3) and pp.fit(skewed, "whiten:3").out_dim == 3
    # scikit-learn's PCA whitening, an independent computation; a component's sign is arbitrary,
    # so compare what a cosine sees: the Gram matrix, which no sign flip changes.
    expected = decomposition.PCA(n_components=3, whiten=True).fit(skewed.astype(np.float64)).transform(skewed)
    assert np.allclose(out @ out.T, expected @ expected.T, rtol=1e-3, atol=2e-3)


def test_abtt_removes_the_top_directions_and_keeps_the_rest(skewed):
    out = pp.fit(skewed, "abtt:2").apply(skewed)
    centred = skewed.astype(np.float64) - skewed.mean(0)
    _, vecs = np.linalg.eigh(np.cov(centred, rowvar=False))  # ascending eigenvalues: the top two are last
    top, rest = vecs[:, -2:], vecs[:, :-2]
    assert out.shape == skewed.shape
    assert np.abs(out @ top).max() < 1e-3
    assert np.allclose(out @ rest, centred @ rest, atol=1e-3)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("abtt", "abtt:10"),
        ("whiten:0", "positive"),
        ("whiten:x", "positive"),
        ("standardize:3", "no ':K'"),
        ("whiten:9", "over the vectors' dimension 8"),
        ("pca", "kind"),
    ],
)
def test_bad_kinds_are_clear_errors(skewed, kind, message):
    with pytest.raises(ValueError, match=message):
        pp.fit(skewed, kind)


def test_top_k_fits_need_more_sentences_than_k_only(skewed):
    assert pp.fit(skewed[:5], "whiten:3").apply(skewed).shape == (400, 3)  # 5 sentences, 8 dimensions
    with pytest.raises(ValueError, match="abtt:3 needs more than 3 sentences"):
        pp.fit(skewed[:3], "abtt:3")
