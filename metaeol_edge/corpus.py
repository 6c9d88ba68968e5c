"""Sentences in, vectors out, as streams: input read line by line, output written row by row.

Input: a text file (one sentence per line) or JSONL (a ``text`` field per line).
Output: ``.npy`` (float32 rows in input order, the header written first from a
count of the input) or ``.jsonl`` (one object per line). Either output is
written under a temporary name and renamed only once complete, so a killed job
never leaves a file that looks valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError
from .files import atomic_write

OUTPUT_SUFFIXES = (".npy", ".jsonl")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8, without its line ending or a leading BOM."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from exc
    with f:
        offset = 0
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start]
                raise InputError(
                    f"{path}, line {n}: invalid UTF-8 (byte {bad:#04x} at offset {offset + exc.start})"
                ) from exc
            offset += len(raw)
            if n == 1:
                line = line.removeprefix("\ufeff")
            yield n, line.rstrip("\r\n")


FORMATS = ("text", "jsonl")


def input_format(path: Path, fmt: str | None = None) -> str:
    """``text`` or ``jsonl``: as given, else by the file's extension (never guessed from its content)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"input format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"


def iter_sentences(path: str | os.PathLike[str], fmt: str | None = None) -> Iterator[str]:
    """The sentences of a text or JSONL file, one at a time, each as given (not stripped).

    Blank lines at the end of a file are ignored; a blank line with a sentence
    after it is an error (in a text file it would be an empty sentence, and
    rows would no longer match lines). JSONL skips blank lines anywhere.
    """
    path = Path(path)
    is_jsonl = input_format(path, fmt) == "jsonl"
    seen = 0
    blank: int | None = None  # the first of a run of blank lines, until a sentence follows it
    for n, line in _lines(path):
        if not line.strip():
            if not is_jsonl and blank is None:
                blank = n
            continue
        if blank is not None:
            raise InputError(f"{path}, line {blank}: empty or whitespace-only sentence")
        if is_jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{path}, line {n}: needs a string 'text' field")
            line = obj["text"]
            if not line.strip():
                raise InputError(f"{path}, line {n}: empty or whitespace-only 'text'")
        seen += 1
        yield line
    if not seen:
        raise InputError(f"{path} holds no sentences")


def count_sentences(path: str | os.PathLike[str], fmt: str | None = None) -> int:
    """Read the whole input once, checking every line, and count its sentences (before any work)."""
    return sum(1 for _ in iter_sentences(path, fmt))


def read_sentences(path: str | os.PathLike[str], fmt: str | None = None) -> list[str]:
    """All sentences of a file, in a list (for inputs that are small by nature: a fitting corpus)."""
    return list(iter_sentences(path, fmt))


def check_output(path: str | os.PathLike[str], inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse, before any work, an output that cannot be written or that is one of the inputs.

    The same file under another name (a symbolic or hard link) is the same file:
    writing the output would replace the input.
    """
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"output must end in .npy or .jsonl, not {out.name!r}")
    for given in inputs:
        src = Path(given)
        same = out.resolve() == src.resolve()
        try:
            same = same or (out.exists() and src.exists() and os.path.samefile(out, src))
        except OSError:
            pass
        if same:
            raise InputError(f"output {out} is the input file {src}: writing it would destroy the input")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # fail before the work, not after
    except OSError as exc:
        raise InputError(f"cannot create the folder of output {out}: {exc.strerror or exc}") from exc
    if out.is_dir():
        raise InputError(f"output {out} is a folder")
    return out


class VectorWriter:
    """Writes vectors as they come to ``path`` (.npy or .jsonl), complete or not at all.

    ``shape`` is one row's shape ((dim,) or (T, dim)); ``layers`` > 1 writes
    (layers, n, *shape) to .npy and a list of vectors per line to .jsonl.
    """

    def __init__(self, path: Path, n: int, shape: tuple[int, ...], layers: int = 1) -> None:
        self.path, self.n, self.shape, self.layers = path, n, shape, layers
        self.npy = path.suffix.lower() == ".npy"
        self._done = 0
        self._context = atomic_write(path)
        try:
            self._f: BinaryIO = self._context.__enter__()
        except OSError as exc:  # name the user's output, not the temporary file beside it
            raise InputError(f"cannot write output {path}: {exc.strerror or exc}") from exc
        if self.npy:
            full = (layers, n, *shape) if layers > 1 else (n, *shape)
            descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
            header = {"descr": descr, "fortran_order": False, "shape": full}
            np.lib.format.write_array_header_1_0(self._f, header)
            self._data_start = self._f.tell()
            self._row_bytes = int(np.prod(shape)) * 4
            if layers > 1:  # layer blocks are written at their offsets; give the file its full size now
                self._f.truncate(self._data_start + layers * n * self._row_bytes)

    def write(self, texts: list[str], vectors: np.ndarray | list[np.ndarray]) -> None:
        try:
            self._write(texts, vectors)
        except OSError as exc:  # a full disk, say: name the user's output, not the temporary file
            raise InputError(f"cannot write output {self.path}: {exc.strerror or exc}") from exc

    def _write(self, texts: list[str], vectors: np.ndarray | list[np.ndarray]) -> None:
        per_layer = vectors if self.layers > 1 else [vectors]
        count = len(texts)
        if self._done + count > self.n:
            raise InputError(f"more rows than the {self.n} counted in the input (did it change while running?)")
        if self.npy:
            for li, rows in enumerate(per_layer):
                data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
                if self.layers > 1:
                    self._f.seek(self._data_start + (li * self.n + self._done) * self._row_bytes)
                self._f.write(data)
        else:
            lines = []
            for i, text in enumerate(texts):
                vec = [rows[i].tolist() for rows in per_layer] if self.layers > 1 else per_layer[0][i].tolist()
                lines.append(json.dumps({"text": text, "embedding": vec}) + "\n")
            self._f.write("".join(lines).encode("utf-8"))
        self._done += count

    def __enter__(self) -> VectorWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Finish: the file appears under its name only if no error came and every counted row was written."""
        if exc is None and self._done != self.n:
            exc = InputError(f"wrote {self._done} of {self.n} rows (did the input change while running?)")
            self._context.__exit__(InputError, exc, None)
            raise exc
        try:
            self._context.__exit__(exc_type, exc, tb)
        except OSError as err:  # flushing or renaming into place failed
            raise InputError(f"cannot write output {self.path}: {err.strerror or err}") from err
