"""The default quantization level: chosen from the file's type, size and the CPU, derived once, announced once."""

import shutil

import numpy as np
import pytest

from metaeol_edge import MetaEOL, quantization, registry

AVX512 = "CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | OPENMP = 1 |"
NEON = "CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 |"
BARE = "CPU : SSE3 = 1 | SSSE3 = 1 |"


@pytest.mark.parametrize("info,simd", [(AVX512, "AVX512"), (NEON, "NEON")])
def test_a_small_q4_1_file_runs_at_f16_where_the_cpu_has_simd_for_it(info, simd):
    choice = quantization.choose("Q4_1", info, 98_000_000)
    assert choice.level == "f16" and simd in choice.reason and "Q4_1" in choice.reason


def test_a_big_q4_1_file_stays_as_shipped():
    choice = quantization.choose("Q4_1", AVX512, 900_000_000)
    assert choice.level == "shipped" and "0.9 GB" in choice.reason


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0", "F16", "Q4_0", ""])
def test_files_on_fast_kernels_run_as_shipped(quant):
    assert quantization.choose(quant, AVX512, 98_000_000).level == "shipped"


def test_without_simd_the_shipped_file_stays():
    choice = quantization.choose("Q5_1", BARE, 98_000_000)
    assert choice.level == "shipped" and "no SIMD" in choice.reason


def test_the_level_asked_for_beats_the_environment(monkeypatch):
    monkeypatch.setenv(quantization.ENV, "shipped")
    assert quantization.requested(None) == "shipped"
    assert quantization.requested("Q8_0") == "q8_0"
    monkeypatch.delenv(quantization.ENV)
    assert quantization.requested(None) == "auto"
    with pytest.raises(ValueError, match=r"unknown quantization level 'q9'; known: auto, shipped, f32"):
        quantization.requested("q9")
    monkeypatch.setenv(quantization.ENV, "fast")
    with pytest.raises(ValueError, match=r"unknown quantization level 'fast' in \$METAEOL_LEVEL"):
        quantization.requested(None)


@pytest.mark.slow
def test_auto_derives_f16_once_says_why_and_names_its_vectors_apart(smollm2, tmp_path, monkeypatch, capfd):
    """A Q4_1 file (a copy, so the store is a fresh one): the first use writes F16 into the store and says
    so; later uses are quiet; the cache keys follow the level."""
    if quantization.choose("Q4_1", quantization.system_info(), 1).level != "f16":
        pytest.skip("this CPU has no SIMD that llama.cpp's 8-bit kernels use: auto keeps the shipped file")
    monkeypatch.delenv(quantization.ENV)
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))
    model = tmp_path / "mine.gguf"
    shutil.copyfile(smollm2, model)
    capfd.readouterr()
    with MetaEOL(str(model), templates="prompteol", cache=tmp_path / "c.sqlite3") as m:
        said = capfd.readouterr().err
        assert m.level == "f16" and m.model_path.name.endswith(".f16.gguf")
        assert "runs at f16 here, not its shipped Q4_1" in said and "level='shipped'" in said
        assert not list(m.model_path.parent.glob("*.f32.gguf"))  # the F32 step is not kept
        assert m.fingerprint != m.source_fingerprint
        assert m.source_fingerprint == registry.get_spec("smollm2-135m").sha256
        got = m.encode(["A man is playing a guitar."])
        keys = m.cache_keys("A man is playing a guitar.")
    with MetaEOL(str(model), templates="prompteol", cache=False, level="shipped") as shipped:
        assert shipped.level == "shipped" and shipped.model_path == model
        assert shipped.cache_keys("A man is playing a guitar.") != keys
        base = shipped.encode(["A man is playing a guitar."])
    with MetaEOL(str(model), templates="prompteol", cache=False, level="f16") as again:
        assert capfd.readouterr().err == ""  # written once, announced once
        assert np.array_equal(again.encode(["A man is playing a guitar."]), got)
    cos = float((got @ base.T).item() / np.linalg.norm(got) / np.linalg.norm(base))
    assert cos >= 0.999


def test_a_preset_keeps_its_shipped_fit_at_the_derived_level(monkeypatch):
    """Presets are chosen by the shipped file: at F16 the quality preset still finds its fit."""
    if quantization.choose("Q4_1", quantization.system_info(), 1).level != "f16":
        pytest.skip("auto keeps the shipped file on this CPU")
    monkeypatch.delenv(quantization.ENV)
    with MetaEOL("smollm2-135m", preset="quality@2", cache=False) as m:  # revision 3 ships no fit for smollm2
        assert m.level == "f16"
        assert m.postprocess_source().name == m.preset.fits["smollm2-135m"].file
        assert m.encode(["A man is playing a guitar."]).shape == (1, 128)


def test_the_reference_backend_reads_the_file_as_given(monkeypatch):
    monkeypatch.delenv(quantization.ENV)
    pytest.importorskip("torch")
    m = MetaEOL("smollm2-135m", templates="prompteol", backend="pytorch", cache=False)
    assert m.level == "shipped" and "pytorch" in m.level_reason
