import json

import pytest
from metaeol_edge.prompts import load_templates, preprocess

from metaeol_edge.errors import TemplateError

PAPER_TASKS = [
    "classification",
    "opinion/fact",
    "sentiment",
    "emotion",
    "paraphrase",
    "synonym",
    "key fact",
    "entity/relation",
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man plays", "A man plays."),  # a '.' is appended
        ("A man plays.", "A man plays."),
        ("Is it raining?", "Is it raining."),  # a final '?' becomes '.'
        ('He said "hi"', "He said 'hi'"),  # ends in '"': nothing appended, quotes become "'"
        ("It's 'fine'", "It's 'fine'"),
        ('a "quoted" word', "a 'quoted' word."),
        ("what? no", "what? no."),  # only a final '?' changes
        ("", ""),
    ],
)
def test_preprocess_follows_the_official_code(raw, expected):
    assert preprocess(raw) == expected


def test_metaeol_set_is_the_papers_eight_templates():
    ts = load_templates("metaeol")
    assert ts.tasks == PAPER_TASKS
    for t in ts.templates:
        assert t.text.count("*sent 0*") == 1
        assert t.text.endswith('in one word:"')
        assert t.text.startswith("In this task, you're")
    assert 'this sentence : "*sent 0*" means in one word:"' in ts.templates[4].text
    # The paper's four meta-tasks, two templates each, in the paper's order (its ablation rows).
    assert ts.meta_tasks() == {
        "text classification": [0, 1],
        "sentiment analysis": [2, 3],
        "paraphrase identification": [4, 5],
        "information extraction": [6, 7],
    }


def test_prompteol_is_the_single_template():
    ts = load_templates("prompteol")
    assert [t.text for t in ts.templates] == ['This sentence : "*sent 0*" means in one word:"']


def test_render_and_prefix():
    t = load_templates("prompteol").templates[0]
    assert t.render("A cat.") == 'This sentence : "A cat." means in one word:"'
    assert t.prefix == 'This sentence : "'


def test_custom_json_and_text_files(tmp_path):
    j = tmp_path / "mine.json"
    j.write_text(json.dumps({"templates": [{"task": "a", "text": "X *sent 0* Y"}, "Z *sent 0*"]}))
    ts = load_templates(j)
    assert ts.name == "mine" and ts.tasks == ["a", "template-2"]
    assert ts.meta_tasks() == {}
    t = tmp_path / "lines.txt"
    t.write_text("# comment\nFirst *sent 0* one\n\nSecond *sent 0* two\n")
    assert [x.text for x in load_templates(t).templates] == ["First *sent 0* one", "Second *sent 0* two"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"templates": [{"task": "bad", "text": "no placeholder here"}]}', "'bad'.*exactly once, found 0"),
        ('{"templates": [{"text": "*sent 0* twice *sent 0*"}]}', "template #1.*found 2"),
        ('{"templates": []}', "holds no templates"),
        ("{not json", "not valid JSON"),
        ('{"templates": [{"task": "a", "text": "*sent 0*"}, {"task": "a", "text": "x *sent 0*"}]}', "repeat"),
        ('{"templates": [{"text": "*sent 0*", "meta_task": 3}]}', "template #1: 'meta_task'"),
    ],
)
def test_invalid_template_files_name_the_file_and_template(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=message) as info:
        load_templates(path)
    assert str(path) in str(info.value)


def test_unknown_set_lists_the_builtin_ones():
    with pytest.raises(TemplateError) as info:
        load_templates("nonexistent")
    for name in ("metaeol", "prompteol", "pretcot", "ke", "prompteol-icl-music"):
        assert name in str(info.value)
