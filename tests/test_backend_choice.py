"""``backend="auto"``: llama.cpp, or PyTorch in bfloat16 with shared template starts on a CPU with AMX tiles.

The rules are checked on their own (no model), then once end to end on smollm2-135m: auto's PyTorch path
gives the engine's vectors, its shared starts give the unshared reference's, and its cache entries and
bulk identity name the backend it chose.
"""

from __future__ import annotations

import numpy as np
import pytest

from metaeol_edge.backends import choice
from metaeol_edge.core.config import EmbedConfig, decisive_options

AMX = {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


def test_auto_runs_pytorch_only_with_amx_torch_a_whole_checked_file_and_no_engine_setting():
    picked = choice.choose("llama", 1, [], AMX, True)
    assert picked.name == "pytorch" and picked.options == choice.FAST_TORCH and "AMX" in picked.reason
    assert choice.choose("gemma3", 1, [], AMX, True).name == "pytorch"
    for args, why in (
        (("llama", 1, [], {"avx512f", "avx512_bf16"}, True), "no AMX tiles"),
        (("llama", 1, [], AMX, False), "PyTorch is not installed"),
        (("llama", 3, [], AMX, True), "split file"),
        (("phi3", 1, [], AMX, True), "not checked for phi3"),
        (("llama", 1, ["n_threads", "level"], AMX, True), "n_threads, level applies to llama.cpp"),
    ):
        got = choice.choose(*args)
        assert got.name == "llama.cpp" and got.options == {} and why in got.reason, (args, got)


def test_the_backend_asked_for_wins_over_the_environment_which_wins_over_auto(monkeypatch):
    monkeypatch.delenv(choice.ENV, raising=False)
    assert choice.requested(None) == choice.AUTO
    monkeypatch.setenv(choice.ENV, "naive")
    assert choice.requested(None) == "naive" and choice.requested("pytorch") == "pytorch"


def test_leaving_llama_cpp_is_said_once_per_machine(tmp_path, capsys):
    picked = choice.choose("llama", 1, [], AMX, True)
    choice.announce("smollm2-135m", picked, tmp_path)
    first = capsys.readouterr().err
    assert "runs on PyTorch (bfloat16) here, not llama.cpp" in first and "METAEOL_BACKEND=llama.cpp" in first
    choice.announce("smollm2-135m", picked, tmp_path)
    assert capsys.readouterr().err == ""
    choice.announce("smollm2-135m", choice.choose("llama", 1, [], set(), True), tmp_path / "other")
    assert capsys.readouterr().err == ""  # llama.cpp is the default: nothing to say


def test_an_identity_without_a_backend_is_0_2s_llama_cpp():
    assert decisive_options({})["backend"] == "llama.cpp"
    assert decisive_options(EmbedConfig.of(backend="pytorch").kwargs())["backend"] == "pytorch"


@pytest.mark.slow
def test_auto_on_an_amx_cpu_runs_shared_bf16_pytorch_with_the_engines_vectors(smollm2, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metaeol_edge import MetaEOL

    monkeypatch.delenv(choice.ENV)
    monkeypatch.delenv("METAEOL_LEVEL")
    monkeypatch.setattr(choice, "cpu_flags", lambda: AMX)  # this CPU's flags, whatever runs the suite
    said = []
    monkeypatch.setattr(choice, "announce", lambda label, picked, where: said.append(picked.name))
    sentences = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches."]
    layers = [-1, 30]  # after the final norm, and the last block's output before it (a hook in PyTorch)
    with MetaEOL(smollm2, templates="prompteol", layer=layers, cache=False) as auto:
        assert auto.resolved_config.backend == "pytorch" and said == ["pytorch"]
        assert dict(auto.resolved_config.backend_options) == choice.FAST_TORCH
        assert auto.level == "shipped"  # PyTorch reads the file as given
        assert "pytorch-bfloat16-cpu-shared" in str(auto._vector_source())
        assert auto.resolved_config.identity()["backend"] == "pytorch"
        got = auto.encode(sentences)
        # Sharing a start is exact up to float rounding: checked in float32 on the same loaded model, where
        # bf16's own rounding (cosines of 0.9999 between two matmul shapes) does not hide a wrong position.
        auto.backend.model.float()
        auto.backend._prefixes.clear()
        shared = auto.encode(sentences)
        auto.backend.share_prefixes = False  # each prompt run whole, as the reference does
        plain = auto.encode(sentences)
    with MetaEOL(smollm2, templates="prompteol", layer=layers, backend="llama.cpp", level="shipped") as engine:
        want = engine.encode(sentences)
    got, shared, plain, want = (np.stack(x) for x in (got, shared, plain, want))  # (layer, sentence, dim)
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    assert cos(shared, plain).min() > 0.999999
    assert cos(got, plain).min() > 0.999  # bf16 against float32
    assert cos(got, want).min() > 0.998  # and against the Q4_1 file in llama.cpp
    # An engine setting keeps llama.cpp, and says which.
    with MetaEOL(smollm2, templates="prompteol", n_threads=1) as threaded:
        assert threaded.resolved_config.backend == "llama.cpp" and "n_threads" in threaded.backend_reason
