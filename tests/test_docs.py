"""The front door: the README stays short and its test command is CI's, the docs build with
``mkdocs build --strict``, and every generated benchmark page (and the README's table) matches
``benchmarks/results/*.json``. No model is loaded here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INSTALL_DOCS = "pip install -e '.[docs]' (mkdocs, mkdocs-material, mkdocstrings[python])"


def pages_module():
    """benchmarks/pages.py, imported (it reads only JSON: no model, no numpy)."""
    spec = importlib.util.spec_from_file_location("pages", ROOT / "benchmarks" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_250_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_command_2_is_what_ci_runs():
    """`.ci/run` runs exactly the README's test command (Start here, command 2)."""
    readme = README.read_text(encoding="utf-8").splitlines()
    command = readme[next(i for i, line in enumerate(readme) if line.startswith("# 2. ")) + 1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command
    assert "docs" in re.search(r"\.\[([^\]]+)\]", command).group(1).split(",")  # the docs tools are installed


def test_benchmark_pages_and_readme_table_are_generated_from_the_results():
    """`python benchmarks/pages.py --check`: a stale page or README table fails, naming the command to run."""
    run = subprocess.run(
        [sys.executable, "benchmarks/pages.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr


def test_readme_table_is_the_scripts_output():
    pages = pages_module()
    text = README.read_text(encoding="utf-8")
    start, end = text.index(pages.BEGIN) + len(pages.BEGIN), text.index(pages.END)
    assert text[start:end] == "\n" + pages.readme_table()
    assert '| `preset="quality"` | smollm2-135m |' in text  # the table holds the presets, per model


def test_pages_name_a_presets_reads_through_the_packages_resolver():
    """pages.py names a preset's layer with the embedder's own resolver: the spellings it accepts come out in
    quality.json's one spelling, and one it refuses fails the page instead of dropping the preset's row."""
    pages = pages_module()
    assert pages.layer_of(1.0, 30) == "30"
    assert pages.layer_of(-1, 30) == "final"
    assert pages.layer_of(-2, 30) == "29"
    assert pages.layer_of([24, " attn: 22-30", "attn:5"], 30) == "unit:24+attn:22-30+attn:5-5"
    with pytest.raises(ValueError, match="attn:FIRST-LAST"):
        pages.layer_of("attn:22 to 30", 30)
    # and every read is written one way, whatever the table
    assert pages.read_of("unit:24+attn:22-30+attn:22-26") == (
        "block 24 with attention spans 22-30 and 22-26 averaged (each at unit length)"
    )
    assert pages.read_of("final+28") == "final layer with block 28 averaged (each scaled by its mean norm)"
    assert pages.read_of("cat:29+24") == "blocks 29 and 24 side by side (each at unit mean norm)"


def test_every_generated_table_names_its_command():
    pages = pages_module()
    for path, text in [*pages.pages().items(), (README, pages.readme_table())]:
        lines = text.splitlines()
        rows = [i for i, line in enumerate(lines) if line.startswith("|")]
        ends = [i for i in rows if i + 1 == len(lines) or not lines[i + 1].startswith("|")]  # a table's last row
        for i in ends:
            following = next((line for line in lines[i + 1 :] if line.strip()), "")
            assert following.startswith(("Made by", "Spearman x100")), f"{path.name}: no command after line {i + 1}"


def test_quality_json_keeps_each_runs_command_once():
    data = json.loads((ROOT / "benchmarks" / "results" / "quality.json").read_text())
    commands = [run["command"] for run in data["runs"]]
    assert len(commands) == len(set(commands))
    assert all(c.startswith("python benchmarks/quality.py ") for c in commands)
    assert not any("command" in row for run in data["runs"] for row in run["rows"])


def test_extras_all_and_dev_hold_what_they_say():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runtime = ["reference", "eval", "server", "bulk", "search", "ray", "langchain", "llama-index"]
    assert set(extras["all"]) == {d for e in runtime for d in extras[e]}
    readme = README.read_text(encoding="utf-8")
    command2 = re.search(r'pip install -e "\.\[([^\]]+)\]"', readme).group(1).split(",")
    assert set(extras["dev"]) == {d for e in [*command2, "bulk"] for d in extras[e]}


def test_mkdocs_build_strict(tmp_path):
    """The docs build with every warning an error: a broken link, page or API reference fails."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip(f"mkdocs is not installed: {INSTALL_DOCS}")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("encode_iter") > 0
