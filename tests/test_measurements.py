import json

import pytest
from conftest import run_cli as run

from metaeol_edge import measurements as ms


def _m(level, speed, score, pairs=300, templates="metaeol"):
    return ms.Measurement("smollm2-135m", level, templates, speed, score, pairs, 1)


def test_advice_names_a_faster_level_that_is_no_less_accurate(tmp_path):
    rows = [_m("shipped", 2.8, 84.0), _m("f16", 4.1, 83.7), _m("q4_0", 5.0, 80.0), _m("f32", 3.5, 84.9)]
    ms.record(tmp_path, rows)
    line = ms.advice(ms.load(tmp_path), "smollm2-135m")  # 0.3 lower counts as equal: within the tolerance
    assert line is not None and "f16 ran 1.46x faster than shipped" in line and "--level f16" in line
    assert ms.advice(ms.load(tmp_path), "smollm2-135m", tolerance=0.1).startswith("smollm2-135m: f32 ran 1.25x")


def test_no_advice_when_faster_levels_are_worse_or_not_comparable(tmp_path):
    ms.record(tmp_path, [_m("shipped", 2.8, 84.0), _m("q4_0", 5.0, 80.0), _m("f16", 4.0, 85.0, pairs=50)])
    assert ms.advice(ms.load(tmp_path), "smollm2-135m") is None
    assert ms.advice([], "smollm2-135m") is None


def test_a_new_run_replaces_the_old_record_and_a_damaged_file_is_ignored(tmp_path):
    ms.record(tmp_path, [_m("f16", 4.0, 84.0)])
    ms.record(tmp_path, [_m("f16", 3.0, 84.0)])
    (only,) = ms.load(tmp_path)
    assert only.sentences_per_s == 3.0 and only.machine == ms.machine()
    ms.path(tmp_path).write_text("{not json")
    assert ms.load(tmp_path) == []


@pytest.mark.slow
def test_bench_measures_levels_and_models_list_gives_the_advice(tmp_path, smollm2, monkeypatch, senteval_root):
    home = tmp_path / "home"
    monkeypatch.setenv("METAEOL_HOME", str(home))
    monkeypatch.setenv("METAEOL_DATA", str(senteval_root))
    (home / "models" / "smollm2-135m").mkdir(parents=True)
    (home / "models" / "smollm2-135m" / smollm2.name).symlink_to(smollm2)  # the pulled model, not a new pull
    r = run("bench", "-t", "prompteol", "--levels", "shipped,q8_0", "--pairs", "5", "--n", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads(ms.path(home / "models").read_text())
    assert [x["level"] for x in rows] == ["shipped", "q8_0"] and all(x["sentences_per_s"] > 0 for x in rows)
    assert "fastest here:" in r.stdout and "advice:" in r.stdout
    # A record that makes q8_0 both faster and better shows up in `metaeol models`.
    rows[1]["sentences_per_s"], rows[1]["stsb"] = rows[0]["sentences_per_s"] * 2, rows[0]["stsb"] + 1
    ms.path(home / "models").write_text(json.dumps(rows))
    r = run("models")
    assert r.returncode == 0 and "advice: smollm2-135m: q8_0 ran 2.00x faster than shipped" in r.stdout
