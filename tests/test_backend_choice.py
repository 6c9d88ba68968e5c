"""``backend="auto"``: llama.cpp, or PyTorch in bfloat16 with shared template starts on a CPU with AMX tiles.

The rules are checked on their own (no model), then once end to end on smollm2-135m: auto's PyTorch path
gives the engine's vectors, its shared starts give the unshared reference's, and its cache entries and
bulk identity name the backend it chose. The PyTorch path's own parts: the checked PyTorch copy of a GGUF
file in the store (read from the second load on) and the cut of shared prompts into forwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from metaeol_edge.backends import choice
from metaeol_edge.core.config import EmbedConfig, decisive_options
from metaeol_edge.methods import make_method
from metaeol_edge.methods.prompts import load_templates

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
        auto.backend.shared_tokens = 1  # one prompt a forward: the cut into forwards changes nothing either
        one_by_one = auto.encode(sentences)
        auto.backend.share_prefixes = False  # each prompt run whole, as the reference does
        plain = auto.encode(sentences)
        # MetaEOL's 8 templates share forwards, each row after its own start, left-padded and masked: the
        # same vectors as each template's forward alone and as the prompts run whole, in 1 forward, not 8.
        meta = [p for s in sentences for p in make_method(None, load_templates("metaeol")).prompts(s)]
        backend = auto.backend
        backend.share_prefixes, backend.shared_tokens = True, 2048
        forwards = []
        counting = backend.model.register_forward_hook(lambda *a: forwards.append(a[1]))
        mixed = backend.states(meta, layers)
        counting.remove()
        assert len(forwards) == 8 + 1  # each template's start once, then every prompt together
        monkeypatch.setattr(backend, "_fitting", lambda rows, starts, tokens: [[i] for i in rows])
        apart = backend.states(meta, layers)
        backend.share_prefixes = False
        whole = backend.states(meta, layers)
    with MetaEOL(smollm2, templates="prompteol", layer=layers, backend="llama.cpp", level="shipped") as engine:
        want = engine.encode(sentences)
    got, shared, one_by_one, plain, want = (np.stack(x) for x in (got, shared, one_by_one, plain, want))
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    assert cos(shared, plain).min() > 0.999999 and cos(one_by_one, plain).min() > 0.999999
    assert cos(got, plain).min() > 0.999  # bf16 against float32
    assert cos(got, want).min() > 0.998  # and against the Q4_1 file in llama.cpp
    assert cos(mixed, whole).min() > 0.999999 and cos(apart, whole).min() > 0.999999
    # An engine setting keeps llama.cpp, and says which.
    with MetaEOL(smollm2, templates="prompteol", n_threads=1) as threaded:
        assert threaded.resolved_config.backend == "llama.cpp" and "n_threads" in threaded.backend_reason


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_then_read_from_its_checked_pytorch_copy(smollm2_shallow, tmp_path, monkeypatch):
    """transformers converts a GGUF file's tokenizer and tensors in Python each time (26 s for smollm2-135m): the
    first load keeps a copy in the store, and later ones read it, with the same tensors and tokens."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import json

    from metaeol_edge.backends.torch import COPY_STAMP, TorchBackend, _copy_is_current, torch_copy_path
    from metaeol_edge.methods import Prompt

    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))
    copy = torch_copy_path(smollm2_shallow, "float32")
    assert copy.parent == tmp_path / "home" / "models" / "derived" and not copy.exists()
    prompts = [Prompt('This sentence : "Zoë\'s café 東京 🙂" means in one word:"', "", "k")]
    first = TorchBackend(smollm2_shallow, dtype="float32")
    assert first.loaded_from == str(smollm2_shallow.parent) and _copy_is_current(copy, transformers.__version__)
    second = TorchBackend(smollm2_shallow, dtype="float32")
    assert second.loaded_from == str(copy)
    for a, b in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert a[0] == b[0] and a[1].equal(b[1])
    assert first.tokenize(prompts[0].text) == second.tokenize(prompts[0].text)
    want = first.states(prompts, [-1, 2])
    assert np.array_equal(want, second.states(prompts, [-1, 2]))
    # A copy damaged since (a file gone) is not read: the GGUF file is, and the copy written again.
    next(copy.glob("*.safetensors")).unlink()
    third = TorchBackend(smollm2_shallow, dtype="float32")
    assert third.loaded_from == str(smollm2_shallow.parent) and np.array_equal(want, third.states(prompts, [-1, 2]))
    assert TorchBackend(smollm2_shallow, dtype="float32").loaded_from == str(copy)
    # A copy from another transformers version, or a half-written one (no stamp), is not read.
    (copy / COPY_STAMP).write_text(json.dumps({"transformers": "0.0"}))
    assert not _copy_is_current(copy, transformers.__version__)
    (copy / COPY_STAMP).unlink()
    assert not _copy_is_current(copy, transformers.__version__)
    assert not list(copy.parent.glob("*.part"))  # nothing left of the writing


def test_the_shared_forwards_token_budget_is_checked():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from metaeol_edge.backends.torch import TorchBackend

    for bad in (0, -5, 1.5, True, "2048"):
        with pytest.raises(ValueError, match="shared_tokens must be a positive integer"):
            TorchBackend("nothing-here.gguf", shared_tokens=bad)


def test_shared_forwards_are_cut_at_the_token_budget_counting_padding():
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from metaeol_edge.backends.torch import TorchBackend

    cut = lambda budget, lengths: TorchBackend._token_batches(  # noqa: E731
        SimpleNamespace(shared_tokens=budget), list(range(len(lengths))), lengths
    )
    # Sorted by length: a batch's width is its last prompt's, so 3 prompts of up to 4 tokens take 12.
    assert cut(12, [2, 3, 4, 4, 5, 9]) == [[0, 1, 2], [3, 4], [5]]
    assert cut(4, [9, 9]) == [[0], [1]]  # a prompt over the budget still runs, alone
    assert cut(2048, [20] * 64) == [list(range(64))]
    assert cut(10**6, [1] * 130) == [list(range(64)), list(range(64, 128)), [128, 129]]  # at most 64 prompts


def test_prompts_of_different_starts_share_a_forward_unless_a_sliding_window_would_cut_one():
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from metaeol_edge.backends.torch import TorchBackend

    starts = {0: (1, 2, 3), 1: (1, 2, 3), 2: (4, 5), 3: ()}
    tokens = [[1, 2, 3, 7, 7], [1, 2, 3, 7], [4, 5, 7, 7, 7, 7], [7, 7]]  # padded: 3 + 4 = 7 tokens a row
    for window, want in ((None, [[0, 1, 2, 3]]), (9, [[0, 1, 2, 3]]), (8, [[0, 1], [2], [3]])):
        config = SimpleNamespace(sliding_window=window)
        backend = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(get_text_config=lambda c=config: c)))
        assert TorchBackend._fitting(backend, [0, 1, 2, 3], starts, tokens) == want, window
