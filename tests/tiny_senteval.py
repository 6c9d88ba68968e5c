"""A tiny SentEval tree, written by the tests, in each set's own file format.

Lets the loaders, scorers, `metaeol eval` and `metaeol bench` be tested on a
machine without the real data. The data is made so that word overlap carries
signal: an STS pair's gold score falls with the words changed between its two
sentences, and each transfer class draws its words from its own vocabulary, so a
bag-of-words scores well above chance and random vectors do not.
"""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = "cat dog man woman child bird horse chef pilot farmer boat train car river city tree house".split()
VERBS = "runs eats reads sings jumps walks cooks drives paints sleeps swims climbs writes plays".split()
OTHERS = "quickly slowly happily near under over beside with without today again often".split()
GOOD = "great wonderful lovely superb brilliant charming delightful excellent".split()
BAD = "awful terrible boring dreadful poor horrible dull nasty".split()
WORDS = NOUNS + VERBS + OTHERS


def _sentence(rng: random.Random, n: int = 6) -> list[str]:
    return [rng.choice(NOUNS), rng.choice(VERBS), *rng.sample(WORDS, n - 2)]


def _pair(rng: random.Random) -> tuple[str, str, float]:
    a = _sentence(rng)
    k = rng.randint(0, len(a))
    b = list(a)
    for i in rng.sample(range(len(a)), k):
        b[i] = rng.choice(WORDS)
    gold = round(5.0 * (1 - k / len(a)), 3)
    return " ".join(a) + " .", " ".join(b) + " .", gold


def _polar(rng: random.Random, label: int) -> str:
    words = _sentence(rng, 5) + rng.sample(GOOD if label else BAD, 2)
    rng.shuffle(words)
    return " ".join(words)


STS_SUBSETS = {
    "STS12-en-test": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13-en-test": ["FNWN", "headlines", "OnWN"],
    "STS14-en-test": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15-en-test": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16-en-test": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def write(root: Path, n: int = 240, seed: int = 0) -> Path:
    """Write every set with about ``n`` items (pairs or sentences) each; return ``root``."""
    rng = random.Random(seed)
    sts = root / "STS"
    for folder, subsets in STS_SUBSETS.items():
        (sts / folder).mkdir(parents=True, exist_ok=True)
        for subset in subsets:
            pairs = [_pair(rng) for _ in range(max(4, n // len(subsets)))]
            (sts / folder / f"STS.input.{subset}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in pairs))
            # One pair without gold in each subset: the loader skips it.
            golds = [f"{g}\n" for _, _, g in pairs[:-1]] + ["\n"]
            (sts / folder / f"STS.gs.{subset}.txt").write_text("".join(golds))
    (sts / "STSBenchmark").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        lines = [
            f"main-captions\tMSRvid\t2012test\t{i:04d}\t{g}\t{a}\t{b}\n"
            for i, (a, b, g) in enumerate(_pair(rng) for _ in range(n))
        ]
        (sts / "STSBenchmark" / f"sts-{split}.csv").write_text("".join(lines))
    (root / "SICK").mkdir(exist_ok=True)
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        rows = [f"{i}\t{a}\t{b}\t{g}\tNEUTRAL\n" for i, (a, b, g) in enumerate(_pair(rng) for _ in range(n))]
        (root / "SICK" / name).write_text(
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment\n" + "".join(rows)
        )
    for folder, stem in (("MR", "rt-polarity"), ("CR", "custrev"), ("MPQA", "mpqa")):
        (root / folder).mkdir(exist_ok=True)
        for suffix, label in ((".pos", 1), (".neg", 0)):
            text = "".join(_polar(rng, label) + "\n" for _ in range(n // 2))
            (root / folder / f"{stem}{suffix}").write_bytes(text.encode("latin-1"))
    (root / "SST" / "binary").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = [(lambda y: f"{_polar(rng, y)}\t{y}\n")(rng.randint(0, 1)) for _ in range(n)]
        (root / "SST" / "binary" / f"sentiment-{split}").write_text("".join(rows))
    (root / "TREC").mkdir(exist_ok=True)
    for name in ("train_5500.label", "TREC_10.label"):
        rows = []
        for i in range(n):
            c = i % len(TREC_CLASSES)
            cue = NOUNS[c * 2 : c * 2 + 2]  # each class asks about its own words
            rows.append(f"{TREC_CLASSES[c]}:sub what {' '.join(cue)} {' '.join(rng.sample(WORDS, 3))} ?\n")
        (root / "TREC" / name).write_bytes("".join(rows).encode("latin-1"))
    (root / "MRPC").mkdir(exist_ok=True)
    for split in ("train", "test"):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
        for i in range(n):
            a, b, g = _pair(rng)
            label = int(g >= 2.5)
            rows.append(f"{label}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\n")
        (root / "MRPC" / f"msr_paraphrase_{split}.txt").write_text("".join(rows), encoding="utf-8")
    return root
