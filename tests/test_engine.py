import numpy as np
import pytest
from metaeol_edge.engine import Engine, LogFilter, Prompt, use_extra_bufts
from metaeol_edge.layers import FINAL, resolve_layer
from metaeol_edge.prompts import load_templates, preprocess

AMX_BUILD = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
PLAIN_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | REPACK = 1 |"


def test_extra_buffers_are_off_unless_asked(monkeypatch):
    monkeypatch.delenv("METAEOL_EXTRA_BUFTS", raising=False)
    assert use_extra_bufts(PLAIN_BUILD, os_grants_amx=lambda: True) is False
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: True) is False


def test_asked_for_extra_buffers_still_avoid_amx_the_os_forbids(monkeypatch):
    monkeypatch.setenv("METAEOL_EXTRA_BUFTS", "1")
    assert use_extra_bufts(PLAIN_BUILD, os_grants_amx=lambda: False) is True
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: False) is False
    assert use_extra_bufts(AMX_BUILD, os_grants_amx=lambda: True) is True


def test_every_load_path_uses_the_safe_parameters(monkeypatch):
    import llama_cpp.llama as high
    from metaeol_edge.engine import model_params, safe_model_params

    monkeypatch.delenv("METAEOL_EXTRA_BUFTS", raising=False)
    assert model_params(0).use_extra_bufts is False
    with safe_model_params():
        assert high.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert high.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored


# The engine's mechanics (lanes, prefixes, chunks, layers) on smollm2-135m's first 4 blocks (conftest's
# smollm2_shallow, a real llama.cpp model with 4 of 30 blocks to run): what is checked here, bit for bit or against
# a whole-prompt decode, does not depend on the depth. The full model's vectors: tests/test_golden.py.
@pytest.fixture(scope="module")
def engine(smollm2_shallow):
    e = Engine(smollm2_shallow)
    yield e
    e.close()


def _prompts(engine, sentences, set_name="metaeol"):
    ts = load_templates(set_name)
    return [
        Prompt(engine.tokenize(t.render(preprocess(s))), engine.tokenize(t.prefix))
        for s in sentences
        for t in ts.templates
    ]


@pytest.mark.slow
def test_a_prompts_vector_does_not_depend_on_what_runs_beside_it(engine, sts_sentences):
    prompts = _prompts(engine, sts_sentences[:4])
    full = engine.embed(prompts)
    assert np.array_equal(engine.embed(prompts[5:19]), full[5:19])
    assert np.array_equal(engine.embed(prompts[::-1])[::-1], full)
    assert np.array_equal(engine.embed([prompts[7]])[0], full[7])


@pytest.mark.slow
def test_prefix_sharing_changes_nothing(engine, sts_sentences):
    shared = _prompts(engine, sts_sentences[10:12])
    alone = [Prompt(p.tokens) for p in shared]
    a, b = engine.embed(shared), engine.embed(alone)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # 1e-5: on 4 blocks, two sentences' vectors of one template are as close as 0.99984 (measured), and the
    # split from the prefix moves a vector by about 1e-7.
    assert cos.min() >= 0.99999
    assert engine.embed(shared).shape == (16, 576)


@pytest.mark.slow
def test_only_new_tokens_are_decoded(smollm2_shallow, sts_sentences):
    engine = Engine(smollm2_shallow, lanes=1)  # one context: each lane holds a prefix of its own (test_lanes_*)
    t = load_templates("metaeol").templates[0]
    prompts = [Prompt(engine.tokenize(t.render(preprocess(s))), engine.tokenize(t.prefix)) for s in sts_sentences[:8]]
    engine.embed(prompts[:1])  # the template's prefix is now in the cache
    before = engine.tokens_decoded
    engine.embed(prompts)
    spent = engine.tokens_decoded - before
    total = sum(len(p.tokens) for p in prompts)
    common = [min(len(p.prefix), len(p.tokens) - 1) for p in prompts]
    assert all(p.tokens[:n] == p.prefix[:n] for p, n in zip(prompts, common, strict=True))
    assert spent == total - sum(common)
    assert spent < 0.5 * total  # the instruction is most of each prompt


def _own_store(engine: Engine, limit: int | None = None):
    from metaeol_edge.backends.snapshots import PrefixSnapshots

    store = PrefixSnapshots() if limit is None else PrefixSnapshots(limit=limit)
    for lane in engine._lanes:
        lane._snapshots = store
    return store


def _own_tokens(engine: Engine, prompts) -> int:
    return sum(len(p.tokens) - engine._shared(p.tokens, tuple(p.prefix), len(p.tokens) - 1) for p in prompts)


@pytest.mark.slow
@pytest.mark.parametrize("shallow", ["smollm2_shallow", "gemma3_shallow"])
def test_a_prefix_is_decoded_once_then_copied_in_with_the_same_bytes(request, shallow, sts_sentences, monkeypatch):
    """Each template's prefix is decoded once and its KV cells saved; later loads, in any lane, copy them into the
    empty cache, and every vector is what a context that decodes each prefix gives, bit for bit. gemma3's
    sliding-window blocks keep their cells in a second cache, which the saved state carries too."""
    path = request.getfixturevalue(shallow)
    decoding = Engine(path, lanes=1, n_threads=1)
    _own_store(decoding, limit=0)  # keeps nothing: every load decodes
    copying = Engine(path, lanes=2, n_threads=1)
    store = _own_store(copying)
    try:
        prompts = _prompts(copying, sts_sentences[30:33])
        want = [decoding.embed(prompts), decoding.embed(prompts[::-1], layers=[FINAL, 2])]
        assert decoding.prefixes_restored == 0 and len(decoding._snapshots) == 0
        first = copying.embed(prompts)
        assert len(store) == 8  # MetaEOL's 8 prefixes
        before, restored = copying.tokens_decoded, copying.prefixes_restored
        again = copying.embed(prompts[::-1], layers=[FINAL, 2])
        # The second call decodes only the prompts' own tokens: every prefix it loads is copied in (a lane may
        # already hold the first one it needs).
        assert copying.tokens_decoded - before == _own_tokens(copying, prompts)
        assert copying.prefixes_restored - restored >= 8 - copying.lanes
        assert first.tobytes() == want[0].tobytes() and again.tobytes() == want[1].tobytes()
        # A saved state llama.cpp refuses is dropped, and the prefix decoded as before (then saved again).
        monkeypatch.setattr(copying._lc, "llama_state_seq_set_data", lambda *args: 0)
        copying._prefix = copying._lanes[1]._prefix = ()
        before, restored = copying.tokens_decoded, copying.prefixes_restored
        assert copying.embed(prompts).tobytes() == want[0].tobytes()
        prefixes = sum(len(p) for p in {tuple(p.prefix) for p in prompts})
        assert copying.prefixes_restored == restored and len(store) == 8
        assert copying.tokens_decoded - before >= _own_tokens(copying, prompts) + prefixes
    finally:
        decoding.close()
        copying.close()


@pytest.mark.slow
def test_engines_on_the_same_file_and_settings_share_saved_prefixes(smollm2_shallow, sts_sentences):
    """The store is the process's: a second engine on the file (MetaEOL made again) decodes no prefix; other
    KV settings are other cells, and decode their own."""
    from metaeol_edge.backends.snapshots import state_key

    first = Engine(smollm2_shallow, lanes=1)
    store = _own_store(first)
    prompts = _prompts(first, sts_sentences[40:41])
    want = first.embed(prompts)
    first.close()
    second, other = Engine(smollm2_shallow, lanes=1), Engine(smollm2_shallow, lanes=1, kv_f32=False)
    try:
        for engine in (second, other):
            engine._snapshots = store
        assert second._state_key == first._state_key != other._state_key
        assert second.embed(prompts).tobytes() == want.tobytes()
        assert second.tokens_decoded == _own_tokens(second, prompts) and second.prefixes_restored == 8
        other.embed(prompts)
        assert other.prefixes_restored == 0 and len(store) == 16
        assert state_key(smollm2_shallow, a=1) != state_key(smollm2_shallow, a=2)
    finally:
        second.close()
        other.close()


def test_saved_prefixes_keep_to_their_byte_limit():
    import ctypes

    from metaeol_edge.backends.snapshots import PrefixSnapshots

    store = PrefixSnapshots(limit=100)  # keys are (state key, prefix) in the engine; any hashable here
    blob = lambda n: (ctypes.c_uint8 * n)()  # noqa: E731
    store.put((1,), blob(40))
    store.put((2,), blob(40))
    assert store.get((1,)) is not None  # now the most recently used
    store.put((3,), blob(40))  # over 100 bytes: the least recently used, (2,), goes
    assert store.get((2,)) is None and store.get((1,)) is not None and store.get((3,)) is not None
    assert store.nbytes == 80 and len(store) == 2
    store.put((4,), blob(101))  # bigger than the whole limit: not kept, nothing dropped for it
    assert store.get((4,)) is None and len(store) == 2
    store.put((1,), blob(10))  # replaced, counted once
    assert store.nbytes == 50
    store.drop((3,))
    assert store.nbytes == 10 and len(store) == 1


@pytest.fixture(scope="module")
def one_lane(smollm2_shallow):
    e = Engine(smollm2_shallow, lanes=1, n_threads=1)
    yield e
    e.close()


@pytest.fixture(scope="module")
def three_lanes(smollm2_shallow):
    e = Engine(smollm2_shallow, lanes=3, n_threads=1)
    yield e
    e.close()


@pytest.mark.slow
def test_lanes_give_the_same_bytes_as_one_context(one_lane, three_lanes, sts_sentences):
    """Several prefixes, a pooled span and two layers: any lane computes a prompt's vector bit for bit
    as one context does (each lane is its own one-at-a-time context over the same model)."""
    prompts = _prompts(one_lane, sts_sentences[:6])
    prompts.append(Prompt(prompts[0].tokens, prompts[0].prefix, rows=(3, len(prompts[0].tokens))))
    assert three_lanes.lanes == 3 and three_lanes.model == three_lanes._lanes[2].model  # one model's weights
    for layers in (None, [FINAL, 2]):
        want = one_lane.embed(prompts, layers=layers)
        got = three_lanes.embed(prompts, layers=layers)
        assert got.tobytes() == want.tobytes()
    assert all(lane.tokens_decoded > 0 for lane in three_lanes._lanes)  # every lane took work


@pytest.mark.slow
def test_lanes_count_their_tokens_and_report_progress(three_lanes, sts_sentences):
    prompts = _prompts(three_lanes, sts_sentences[20:24])
    done: list[float] = []
    before = [lane._decoded for lane in three_lanes._lanes]
    three_lanes.embed(prompts, progress=done.append)
    spent = three_lanes.tokens_decoded - sum(before)
    assert spent == sum(lane._decoded - b for lane, b in zip(three_lanes._lanes, before, strict=True))
    own = sum(len(p.tokens) - min(len(p.prefix), len(p.tokens) - 1) for p in prompts)  # every prompt's own tokens
    prefixes = sum(len(p) for p in {tuple(p.prefix) for p in prompts})
    assert own <= spent <= own + three_lanes.lanes * prefixes  # each lane decodes a prefix at most once
    assert sum(done) == pytest.approx(len(prompts))


@pytest.mark.slow
def test_a_single_prompt_runs_on_one_lane_with_every_thread(three_lanes, sts_sentences):
    prompts = _prompts(three_lanes, sts_sentences[:1], "prompteol")
    calls: list[int] = []
    original = three_lanes._set_threads
    three_lanes._set_threads = lambda n: (calls.append(n), original(n))  # type: ignore[method-assign]
    try:
        three_lanes.embed(prompts)
    finally:
        del three_lanes._set_threads
    assert calls == [3, 1] and three_lanes._threads_now == 1


@pytest.mark.slow
def test_an_error_in_one_lane_reaches_the_caller(three_lanes, sts_sentences, monkeypatch):
    prompts = _prompts(three_lanes, sts_sentences[:4])
    lane = three_lanes._lanes[2]

    def broken(*args, **kwargs):
        raise RuntimeError("lane 2 failed")

    monkeypatch.setattr(lane, "_embed_one", broken)
    with pytest.raises(RuntimeError, match="lane 2 failed"):
        three_lanes.embed(prompts)
    monkeypatch.undo()
    assert three_lanes.embed(prompts[:3]).shape == (3, 576)  # the engine still works


@pytest.mark.parametrize(
    "mode,n_threads,lanes,expected",
    [
        ("one-at-a-time", None, None, (4, 1)),  # a single-thread lane per core
        ("one-at-a-time", 3, None, (1, 3)),  # n_threads alone: 0.2's one context
        ("one-at-a-time", None, 2, (2, 2)),  # lanes alone share the cores
        ("one-at-a-time", 2, 2, (2, 2)),
        ("packed", None, None, (1, 4)),  # packed: one context with every core
    ],
)
def test_lane_plan(monkeypatch, mode, n_threads, lanes, expected):
    from metaeol_edge import engine as engine_module

    monkeypatch.setattr(engine_module, "default_threads", lambda: 4)
    assert engine_module.lane_plan(mode, n_threads, lanes) == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_lane_plan_refuses_nonsense(bad):
    from metaeol_edge.engine import lane_plan

    with pytest.raises(ValueError, match="lanes must be"):
        lane_plan("one-at-a-time", None, bad)
    with pytest.raises(ValueError, match="n_threads must be"):
        lane_plan("one-at-a-time", bad, None)


def test_lanes_are_for_the_one_at_a_time_mode():
    from metaeol_edge.engine import lane_plan

    with pytest.raises(ValueError, match="lanes apply to"):
        lane_plan("packed", None, 2)


@pytest.mark.slow
def test_long_prompts_are_decoded_in_chunks(smollm2_shallow):
    e = Engine(smollm2_shallow, max_length=1500, n_batch=256)
    try:
        text = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)
        t = load_templates("prompteol").templates[0]
        tokens = e.tokenize(t.render(text))
        assert len(tokens) > 3 * 256
        chunked = e.embed([Prompt(tokens, e.tokenize(t.prefix))])[0]
        whole = e.embed([Prompt(tokens)])[0]
        cos = float(chunked @ whole / np.linalg.norm(chunked) / np.linalg.norm(whole))
        assert cos >= 0.99999  # as in test_prefix_sharing_changes_nothing (5 tokens fewer: 0.96)
        with pytest.raises(ValueError, match="exceeds max_length"):
            e.embed([Prompt(tokens * 2)])
    finally:
        e.close()


def test_layer_choices_resolve_to_blocks_or_final():
    assert resolve_layer(-1, 30) == FINAL
    assert [resolve_layer(k, 30) for k in (1, 15, 30)] == [1, 15, 30]
    assert resolve_layer(-2, 30) == 29  # as hidden_states[-2]
    assert resolve_layer(-30, 30) == 1
    assert resolve_layer(0.8, 30) == 24
    assert resolve_layer("0.5", 18) == 9
    assert resolve_layer("12", 30) == 12
    assert resolve_layer(1.0, 30) == 30
    assert resolve_layer(0.01, 30) == 1


@pytest.mark.parametrize("bad", [0, 31, -31, 1.5, -0.5, "x", "", True, None])
def test_impossible_layers_are_refused_with_the_range(bad):
    with pytest.raises(ValueError, match="layer"):
        resolve_layer(bad, 30)


@pytest.mark.slow
def test_several_layers_are_read_in_one_pass(engine, sts_sentences):
    prompts = _prompts(engine, sts_sentences[:2])
    n = engine.n_layer  # 4: the shallow copy
    many = engine.embed(prompts, layers=[FINAL, 2, n, 1])
    assert many.shape == (4, 16, 576)
    assert np.array_equal(many[0], engine.embed(prompts))
    assert np.array_equal(many[1], engine.embed(prompts, layers=[2])[0])
    assert np.array_equal(many[3], engine.embed(prompts, layers=[1])[0])
    # Block n is the last block's output before the final norm: same direction up to
    # the norm's per-dimension weight, so not the final vector.
    assert not np.allclose(many[2], many[0])
    with pytest.raises(ValueError, match="block number"):
        engine.embed(prompts, layers=[n + 1])


def test_llama_cpp_errors_are_shown_and_warnings_are_not():
    quiet = LogFilter(verbose=False)
    assert [quiet(level) for level in (2, 3, 4, 5, 3, 5)] == [False, False, True, True, False, False]
    assert all(LogFilter(verbose=True)(level) for level in (1, 2, 3, 4, 5))
