"""Template sets: load them from data files, validate them, fill them with sentences.

A template set is a JSON file::

    {"name": "...", "placeholder": "*sent 0*",
     "templates": [{"task": "sentiment", "text": "... \\"*sent 0*\\" ... in one word:\\""}]}

The built-in sets live in the top-level ``prompts/`` folder, installed as package data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from metaeol_edge.errors import TemplateError
from metaeol_edge.files import package_data

DEFAULT_PLACEHOLDER = "*sent 0*"


@dataclass(frozen=True)
class Template:
    task: str
    text: str
    placeholder: str = DEFAULT_PLACEHOLDER
    meta_task: str | None = None  # the paper's meta-task this template belongs to, where the file says

    @property
    def prefix(self) -> str:
        """The fixed instruction before the sentence: the part prompts can share."""
        return self.text.split(self.placeholder, 1)[0]

    def render(self, sentence: str) -> str:
        # The official code strips the filled-in prompt; only the template's own
        # edges can change by that, since sentences are stripped on the way in.
        return self.text.replace(self.placeholder, sentence).strip()


@dataclass(frozen=True)
class TemplateSet:
    name: str
    templates: tuple[Template, ...]
    source: str

    def __len__(self) -> int:
        return len(self.templates)

    @property
    def tasks(self) -> list[str]:
        return [t.task for t in self.templates]

    def meta_tasks(self) -> dict[str, list[int]]:
        """Meta-task name -> indices of its templates, for templates whose file names one."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.templates):
            if t.meta_task:
                groups.setdefault(t.meta_task, []).append(i)
        return groups


def preprocess(sentence: str) -> str:
    """The official MetaEOL/PromptEOL sentence pre-processing, in the authors' order.

    Append '.' unless the sentence ends in . ? " ', then replace '"' with "'",
    then turn a final '?' into '.'.
    """
    s = sentence
    if len(s) > 0 and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if len(s) > 0 and s[-1] == "?":
        s = s[:-1] + "."
    return s


def _builtin_dir():
    return package_data("prompt_sets", "prompts")


def builtin_names() -> list[str]:
    folder = _builtin_dir()
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")) if folder else []


def load_templates(name_or_path: str | Path) -> TemplateSet:
    """Load a built-in set by name (``metaeol``, ``prompteol``) or a user's JSON/text file.

    A plain-text file holds one template per line (blank lines and lines starting
    with ``#`` are skipped) with the default placeholder.
    """
    path = Path(name_or_path)
    if not path.is_file():
        folder = _builtin_dir()
        candidate = Path(folder / f"{name_or_path}.json") if folder else None
        if candidate is None or not candidate.is_file() or "/" in str(name_or_path):
            raise TemplateError(
                f"no template set named or at {str(name_or_path)!r}; built-in sets: "
                f"{', '.join(builtin_names()) or 'none found'}; or give a path to a .json or .txt file"
            )
        path = candidate
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        return _parse_json(raw, path)
    return _parse_lines(raw, path)


def _parse_json(raw: str, path: Path) -> TemplateSet:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"template file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("templates"), list):
        raise TemplateError(f"template file {path} must be an object with a 'templates' list")
    placeholder = data.get("placeholder", DEFAULT_PLACEHOLDER)
    if not isinstance(placeholder, str) or not placeholder:
        raise TemplateError(f"template file {path}: 'placeholder' must be a non-empty string")
    templates = []
    for i, entry in enumerate(data["templates"]):
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise TemplateError(f"template file {path}, template #{i + 1}: needs a 'text' string")
        task = str(entry.get("task") or f"template-{i + 1}")
        meta = entry.get("meta_task")
        if meta is not None and (not isinstance(meta, str) or not meta.strip()):
            raise TemplateError(f"template file {path}, template #{i + 1}: 'meta_task' must be a non-empty string")
        templates.append(Template(task=task, text=entry["text"], placeholder=placeholder, meta_task=meta))
    return _validated(str(data.get("name") or path.stem), templates, path)


def _parse_lines(raw: str, path: Path) -> TemplateSet:
    templates = [
        Template(task=f"template-{i + 1}", text=line)
        for i, line in enumerate(ln for ln in raw.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))
    ]
    return _validated(path.stem, templates, path)


def _validated(name: str, templates: list[Template], path: Path) -> TemplateSet:
    if not templates:
        raise TemplateError(f"template file {path} holds no templates")
    for i, t in enumerate(templates):
        count = t.text.count(t.placeholder)
        if count != 1:
            where = f"template #{i + 1} ({t.task!r}: {t.text[:60]!r}...)"
            raise TemplateError(
                f"template file {path}, {where}: the placeholder {t.placeholder!r} must appear "
                f"exactly once, found {count} times"
            )
    tasks = [t.task for t in templates]
    dupes = sorted({x for x in tasks if tasks.count(x) > 1})
    if dupes:
        raise TemplateError(f"template file {path}: task names repeat: {', '.join(dupes)}")
    return TemplateSet(name=name, templates=tuple(templates), source=str(path))
