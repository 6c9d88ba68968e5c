"""What a collection reads: the files under the paths it is given, and each file's text or rows.

Folders are walked with symbolic links followed, each real folder once (a link
back to a folder above is a loop: skipped and reported). Text files (``.txt``,
``.md``, ``.rst``, source code, ...) are read whole as UTF-8; ``.jsonl``,
``.csv`` and ``.parquet`` files row by row through :mod:`metaeol_edge.corpus`,
with a text column and an optional id column. What cannot be read (binary,
not UTF-8, a broken link, a file that vanished, a table without the column) is
skipped and reported with its path and why, never an error for the whole run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from metaeol_edge.corpus import iter_records
from metaeol_edge.errors import InputError

TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .adoc .org .tex .py .pyi .ipynb .js .jsx .ts .tsx .mjs .java .kt .scala .c .h "
    ".cc .cpp .cxx .hpp .hh .cs .go .rs .rb .php .swift .m .mm .lua .pl .r .jl .hs .ml .ex .exs .erl .clj .el "
    ".vim .sh .bash .zsh .fish .ps1 .sql .html .htm .css .scss .xml .toml .yaml .yml .ini .cfg .conf .json "
    ".proto .graphql .dart .zig .nim .v .sv .vhdl".split()
)
TABLE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_EXCLUDE = (".*", "node_modules", "__pycache__", "*.egg-info")  # hidden files and folders (.git, .venv)
MAX_TEXT_BYTES = 20_000_000  # a text file larger than this is skipped (a log, a dump), not read into memory
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Found:
    """A file to read: its absolute path (links not resolved: the path the user sees), the folder or file
    it was found under, how it is read, and its size and modification time."""

    path: str
    root: str
    kind: str  # "text" or a table format: "jsonl", "csv", "parquet"
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Settings:
    """How the files under a root are chosen and read (kept per root, reused by a later ``index``)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    text_column: str = "text"
    id_column: str | None = None

    def to_json(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "text_column": self.text_column,
                "id_column": self.id_column}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> Settings:
        return cls(tuple(data["include"]), tuple(data["exclude"]), data["text_column"], data["id_column"])


def absolute(path: str | os.PathLike[str]) -> str:
    """The absolute, normalised form of a path, symbolic links kept (what a collection stores and shows)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def kind_of_file(path: str) -> str | None:
    """How a file is read by its suffix: "text", a table format, or None (not read unless included)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TABLE_FORMATS:
        return TABLE_FORMATS[suffix]
    return "text" if suffix in TEXT_SUFFIXES else None


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(root: str | os.PathLike[str], settings: Settings = Settings()) -> tuple[list[Found], list[Skipped]]:
    """The files under ``root`` (a folder, or one file) that ``settings`` chooses, sorted, and those skipped.

    A missing path is an :class:`InputError`. A file given by name is read whatever its suffix.
    """
    top = absolute(root)
    if not os.path.lexists(top):
        raise InputError(f"no such file or folder: {top}")
    found: list[Found] = []
    skipped: list[Skipped] = []
    if not os.path.isdir(top):
        one = _stat(top, top, kind_of_file(top) or "text")
        (found if isinstance(one, Found) else skipped).append(one)
        return found, skipped
    exclude = settings.exclude + DEFAULT_EXCLUDE
    seen: dict[tuple[int, int], str] = {}

    def on_error(exc: OSError) -> None:
        skipped.append(Skipped(absolute(exc.filename or top), f"cannot read the folder: {exc.strerror or exc}"))

    for folder, dirs, files in os.walk(top, followlinks=True, onerror=on_error):
        try:
            st = os.stat(folder)
        except OSError as exc:
            skipped.append(Skipped(folder, f"cannot read the folder: {exc.strerror or exc}"))
            dirs[:] = []
            continue
        here = (st.st_dev, st.st_ino)
        if here in seen:
            real, first = os.path.realpath(folder), seen[here]
            parent = os.path.realpath(os.path.dirname(folder))
            loop = os.path.islink(folder) and (parent == real or parent.startswith(real + os.sep))
            why = "symbolic link loop" if loop else f"the same folder as {first}, read there"
            skipped.append(Skipped(folder, f"{why} (links to {real})"))
            dirs[:] = []
            continue
        seen[here] = folder
        rel_folder = os.path.relpath(folder, top).replace(os.sep, "/")
        rel_folder = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = sorted(d for d in dirs if not _matches(rel_folder + d, exclude))
        for name in sorted(files):
            rel = rel_folder + name
            if _matches(rel, exclude):
                continue
            path = os.path.join(folder, name)
            kind = kind_of_file(name)
            if settings.include:
                if not _matches(rel, settings.include):
                    continue
                kind = kind or "text"
            elif kind is None:
                continue
            one = _stat(path, top, kind)
            (found if isinstance(one, Found) else skipped).append(one)
    return found, skipped


def _stat(path: str, root: str, kind: str) -> Found | Skipped:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Skipped(path, "broken symbolic link" if os.path.islink(path) else "vanished while the folder was read")
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return Skipped(path, "symbolic link loop")
        return Skipped(path, f"cannot read it: {exc.strerror or exc}")
    if not os.path.isfile(path):
        return Skipped(path, "not a regular file")
    return Found(path, root, kind, st.st_size, st.st_mtime_ns)


# -- reading --------------------------------------------------------------------------------------


class Unreadable(Exception):
    """A file skipped, with the reason (the caller counts and reports it)."""


def content_hash(data: bytes, kind: str, settings: Settings) -> str:
    """A file's identity for change detection: its bytes, and for a table the columns read from it."""
    h = hashlib.sha256(data)
    if kind != "text":
        h.update(f"\x00{kind}\x00{settings.text_column}\x00{settings.id_column}".encode())
    return h.hexdigest()


def read_bytes(found: Found) -> bytes:
    try:
        if found.kind == "text" and os.path.getsize(found.path) > MAX_TEXT_BYTES:
            raise Unreadable(f"over {MAX_TEXT_BYTES // 1_000_000} MB; --exclude it, or split it")
        with open(found.path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Unreadable("vanished before it was read") from None
    except IsADirectoryError:
        raise Unreadable("became a folder before it was read") from None
    except OSError as exc:
        raise Unreadable(f"cannot read it: {exc.strerror or exc}") from None


def decode_text(data: bytes) -> str:
    """A text file's bytes as text; binary data (a NUL byte near the start) or invalid UTF-8 is :class:`Unreadable`."""
    if b"\x00" in data[:SNIFF_BYTES]:
        raise Unreadable("binary (a NUL byte in its first 8 KB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise Unreadable(f"not UTF-8 (byte {data[exc.start]:#04x} on line {line})") from None
    return text.removeprefix("\ufeff")


def table_rows(found: Found, settings: Settings) -> Iterator[tuple[int, object, str]]:
    """(row number from 1, id or None, text) of each row of a table; a bad table is :class:`Unreadable`."""
    try:
        for n, (id_, text) in enumerate(iter_records(found.path, found.kind, settings.text_column,
                                                     settings.id_column), 1):  # fmt: skip
            yield n, id_, text
    except InputError as exc:
        raise Unreadable(str(exc).removeprefix(f"{found.path}, ").removeprefix(f"{found.path}: ")) from None
    except FileNotFoundError:
        raise Unreadable("vanished while it was read") from None
    except OSError as exc:
        raise Unreadable(f"cannot read it: {exc.strerror or exc}") from None
