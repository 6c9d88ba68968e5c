import json

import numpy as np
import pytest
from conftest import FAKE, needs_senteval, senteval_dir
from conftest import run_cli as run

from metaeol_edge.errors import InputError
from metaeol_edge.evaluation import (
    STS_TASKS,
    TRANSFER_TASKS,
    _saved_items,
    data_dir,
    load_sts,
    load_transfer,
    rankdata,
    rescore_saved,
    run_sts,
    run_transfer,
    spearman,
)

# Pair counts as the data's README lists them (STS16: lines without gold skipped).
PAIRS = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186, "stsb": 1379, "sickr": 4927}


def test_ranks_give_ties_their_average():
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_on_known_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Pearson of the ranks [1,2,3,4] and [1,3,2,4]: 0.8
    assert spearman([1, 2, 3, 4], [1, 5, 3, 7]) == pytest.approx(0.8)


@needs_senteval
@pytest.mark.parametrize("task", STS_TASKS)
def test_every_sts_task_loads_with_its_documented_size(task):
    data = load_sts(task, senteval_dir())
    assert len(data) == PAIRS[task] == len(data.a) == len(data.b)
    assert np.isfinite(data.gold).all() and all(data.a) and all(data.b)


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="nowhere.*METAEOL_DATA"):
        data_dir()
    with pytest.raises(InputError, match="is missing"):
        load_sts("stsb", tmp_path)


def _hashed_bag_of_words(sentences):
    out = np.zeros((len(sentences), 64), np.float32)
    for i, s in enumerate(sentences):
        for w in s.lower().split():
            out[i, sum(w.encode()) % 64] += 1
    return out + 1e-3


def test_every_task_loads_from_files_in_its_own_format(tmp_path):
    """The loaders on a tiny tree the test writes (tests/tiny_senteval.py): every set, every split."""
    from tiny_senteval import NOUNS, STS_SUBSETS, write

    n = 60
    root = write(tmp_path, n=n)
    for task in STS_TASKS:
        if task in ("stsb", "sickr"):
            splits, expected = ("train", "dev", "test"), n
        else:  # each subset holds n // len(subsets) pairs, the last one without gold
            subsets = STS_SUBSETS[f"{task.upper()}-en-test"]
            splits, expected = ("test",), (n // len(subsets) - 1) * len(subsets)
        for split in splits:
            data = load_sts(task, root, split)
            assert len(data) == expected and np.isfinite(data.gold).all() and all(data.a) and all(data.b)
            assert data.a[0].endswith(" .") and 0.0 <= data.gold.min() <= data.gold.max() <= 5.0
    sizes = {"mr": {"all": n}, "cr": {"all": n}, "mpqa": {"all": n}, "sst2": {"train": n, "dev": n, "test": n}}
    sizes |= {"trec": {"train": n, "test": n}, "mrpc": {"train": n, "test": n}}
    for task in TRANSFER_TASKS:
        data = load_transfer(task, root)
        assert {k: len(v[2]) for k, v in data.splits.items()} == sizes[task]
        a, b, y = next(iter(data.splits.values()))
        assert all(a) and (b is None) == (task != "mrpc") and len(set(y.tolist())) == (6 if task == "trec" else 2)
    assert load_transfer("mrpc", root).splits["train"][0][0].split()[0] in NOUNS  # the BOM and header are gone


def test_a_score_can_be_recomputed_from_the_saved_embeddings(tmp_path, senteval_root):
    data = load_sts("stsb", senteval_root, "test", limit=200)
    result = run_sts(data, _hashed_bag_of_words, tmp_path)
    assert result["pairs"] == 200 and 20 < result["score"] < 100  # word overlap does correlate (not perfectly)
    assert rescore_saved(tmp_path, "stsb") == pytest.approx(result["score"], abs=1e-9)


def test_eval_prints_json_scores(tmp_path, smollm2, senteval_root):
    # The command's logic (tasks, JSON, saved vectors that rescore to the printed scores, refusals) on the
    # fake backend over smollm2's file; eval on the real engine is test_reference.py's (and the benchmarks').
    r = run(
        "eval",
        *FAKE,
        "--data",
        senteval_root,
        "-m",
        smollm2,
        "-t",
        "prompteol",
        "--tasks",
        "stsb,sickr,mrpc",
        "--limit",
        "30",
        "--json",
        "-q",
        "--save-embeddings",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["scores"]) == {"stsb", "sickr", "mrpc"} and report["details"]["stsb"]["pairs"] == 30
    for task, score in report["scores"].items():
        assert rescore_saved(tmp_path, task) == pytest.approx(score, abs=1e-6)
    r = run("eval", *FAKE, "-m", smollm2, "--tasks", "stsb,sts99")
    assert r.returncode == 2 and "unknown task(s) sts99" in r.stderr
    r = run("eval", *FAKE, "-m", smollm2, "--tasks", "mrpc", "--jobs", "0")
    assert r.returncode == 2 and "--jobs takes a number of processes" in r.stderr


# Sizes as the data's README lists them.
TRANSFER_SIZES = {
    "mr": {"all": 10662},
    "cr": {"all": 3771},  # the README's 2406 + 1367 count one empty line in each file, which is no sentence
    "mpqa": {"all": 10603},  # likewise one empty line in mpqa.neg
    "sst2": {"train": 67349, "dev": 872, "test": 1821},
    "trec": {"train": 5452, "test": 500},
    "mrpc": {"train": 4076, "test": 1725},
}


@needs_senteval
@pytest.mark.parametrize("task", TRANSFER_TASKS)
def test_every_transfer_task_loads_with_its_documented_size(task):
    data = load_transfer(task, senteval_dir())
    assert {k: len(v[2]) for k, v in data.splits.items()} == TRANSFER_SIZES[task]
    for a, b, y in data.splits.values():
        assert len(a) == len(y) and all(a) and (b is None or len(b) == len(a))
        assert len(set(y.tolist())) == (6 if task == "trec" else 2)


def test_a_transfer_limit_keeps_every_class(senteval_root):
    data = load_transfer("mr", senteval_root, limit=10)
    assert sorted(data.splits["all"][2].tolist()) == [0] * 5 + [1] * 5


@pytest.mark.parametrize("task", ["cr", "trec", "mrpc"])
def test_transfer_scores_rise_above_chance_with_informative_vectors(task, senteval_root):
    pytest.importorskip("sklearn")
    data = load_transfer(task, senteval_root, limit=300)
    result = run_transfer(data, _hashed_bag_of_words)
    chance = max(np.bincount(np.unique(s[2], return_inverse=True)[1]).max() / len(s[2]) for s in data.splits.values())
    assert result["score"] > 100 * chance - 5  # bag of words is weak, but no worse than the majority class
    noise = np.random.default_rng(0).normal(size=(len(data.sentences()), 64)).astype(np.float32)
    assert run_transfer(data, lambda s: noise)["score"] < result["score"] + 1  # random vectors learn nothing


@pytest.mark.parametrize("task", ["mr", "sst2", "trec", "mrpc"])  # 10-fold CV, dev-tuned, inner-CV, pairs
def test_a_transfer_score_is_the_same_in_parallel_and_from_the_saved_files(task, tmp_path, senteval_root):
    pytest.importorskip("sklearn")
    data = load_transfer(task, senteval_root, limit=150)
    serial = run_transfer(data, _hashed_bag_of_words, tmp_path / "serial", np.float16, n_jobs=1)["score"]
    parallel = run_transfer(data, _hashed_bag_of_words, tmp_path / "parallel", np.float16, n_jobs=2)["score"]
    assert parallel == serial
    assert rescore_saved(tmp_path / "parallel", task) == serial
    saved = _saved_items(tmp_path / "parallel" / f"{task}.items.tsv", task)
    for split, (_, _, y) in saved.splits.items():  # labels come back as the loader made them
        assert y.tolist() == data.splits[split][2].tolist()
    assert np.load(tmp_path / "parallel" / f"{task}.npy").dtype == np.float16
    n_items = sum(len(y) for _, _, y in data.splits.values())
    assert len((tmp_path / "parallel" / f"{task}.items.tsv").read_text().splitlines()) == n_items
