"""The prompt-only template sets of issue 20 (Pretended CoT, Knowledge Enhancement, one-shot
PromptEOL, one-shot MetaEOL): each is data, and the engine's vectors for it agree with the naive recipe's."""

import pytest
from conftest import cosine
from metaeol_edge.prompts import load_templates

from metaeol_edge import MetaEOL

SETS = ["pretcot", "ke", "prompteol-icl-smoking", "prompteol-icl-music", "prompteol-icl-equestrian"]
# Issue 33: CK's two prompts each with the demonstration, and Contrastive Prompting's auxiliary prompt.
ISSUE_33 = ["pretcot-icl-music", "ke-icl-music", "cp-aux"]
# Issue 33's lever 6: 2 and 3 demonstrations, the chosen one nearest the input.
SEVERAL = {"prompteol-icl-2": "prompteol-icl-music", "prompteol-icl-3": "prompteol-icl-music"}
SEVERAL |= {"ke-icl-2": "ke-icl-music", "ke-icl-3": "ke-icl-music"}


@pytest.mark.parametrize("set_name", SETS + ISSUE_33 + list(SEVERAL))
def test_each_set_is_one_template_ending_in_one_word(set_name):
    templates = load_templates(set_name)
    assert len(templates) == 1
    text = templates.templates[0].text
    assert text.endswith('in one word:"') and text.count("*sent 0*") == 1
    # A demonstration sits in the shared prefix, so a one-shot prompt costs about what PromptEOL does.
    if "icl" in set_name:
        assert 'means in one word:"' in templates.templates[0].prefix


@pytest.mark.parametrize("plain_name", ["pretcot", "ke"])
def test_ck_with_a_demonstration_asks_its_own_question_of_the_demonstration_first(plain_name):
    """As metaeol-icl does: the instruction once, the prompt's question asked of prompteol-icl-music's sentence
    with that set's answer, then of the input."""
    plain = load_templates(plain_name).templates[0].text
    icl = load_templates(f"{plain_name}-icl-music").templates[0].text
    music = load_templates("prompteol-icl-music").templates[0].text
    head, _, query = plain.partition('this sentence : "*sent 0*"')
    demo = music[: music.index('"Music"') + len('"Music"')].removeprefix("This sentence : ")
    assert icl == f'{head}this sentence : {demo}. This sentence : "*sent 0*"{query}'


@pytest.mark.parametrize("name", list(SEVERAL))
def test_more_demonstrations_come_between_the_instruction_and_the_chosen_one(name):
    """The one-shot set with the other demonstrations inserted before its own, each written as it writes its
    one: the same start, the same end from the chosen demonstration on, one question per demonstration more."""
    many = load_templates(name).templates[0].text
    one = load_templates(SEVERAL[name]).templates[0].text
    chosen = one.index('his sentence : "A man is playing on a guitar and singing."') - 1  # "This" or "this"
    assert many.startswith(one[:chosen]) and many.endswith(one[chosen + 1 :])
    assert many.count('means in one word:"') == one.count('means in one word:"') + int(name[-1]) - 1
    others = many[chosen : -len(one[chosen + 1 :])]
    assert others.count('" means in one word:"') == int(name[-1]) - 1 and others.endswith(('". T', '".T'))


def test_one_shot_metaeol_asks_each_task_of_the_demonstration_first():
    metaeol = load_templates("metaeol")
    shot = load_templates("metaeol-icl")
    assert [t.task for t in shot.templates] == [t.task for t in metaeol.templates]
    for plain, icl in zip(metaeol.templates, shot.templates, strict=True):
        head, _, query = plain.text.partition('this sentence : "*sent 0*"')
        # The instruction once, the task's own question asked of the demonstration, then of the input.
        assert icl.text.startswith(head) and icl.text.count(head) == 1
        assert icl.text.endswith('This sentence : "*sent 0*"' + query)
        assert 'this sentence : "A man is playing on a guitar and singing."' + query in icl.text
        assert icl.text.count("*sent 0*") == 1
        # The demonstration sits in the shared prefix, so it costs about nothing per sentence.
        assert "A man is playing on a guitar and singing." in icl.prefix


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_fixture, set_name",
    [("smollm2_shallow", s) for s in [*SETS, "metaeol-icl", "ke-icl-music"]]
    + [("gemma3_shallow", s) for s in ("pretcot", "ke")],
)
def test_the_engine_agrees_with_the_naive_recipe(request, model_fixture, set_name, sts_sentences, naive_vectors):
    """Two sentences (the set is the subject; the sentences' edge cases are test_embedder.py's): a real one, and
    one with quotes and no final stop. The recipe decodes each prompt whole, demonstrations and all. On the models'
    first 4 blocks (conftest's *_shallow): how a set's prompts are split into a shared start and their own tokens
    is what can go wrong here, and it is the same at any depth; the full models: tests/test_embedder.py."""
    path = request.getfixturevalue(model_fixture)
    sentences = [sts_sentences[0], 'He said "hello" to me']
    expected = naive_vectors(path, set_name, sentences, per_template=True)
    with MetaEOL(path, templates=set_name, cache=False) as model:
        got = model.encode(sentences, per_template=True)
    # 1e-5: on 4 blocks the two sentences' vectors of one template are up to 0.9984 alike (measured), and the
    # engine's differ from the recipe's by about 1e-7.
    assert cosine(got, expected).min() >= 0.99999
    assert cosine(got.mean(axis=1), expected.mean(axis=1)).min() >= 0.99999
