"""Sentences in, vectors out, as streams: input read row by row, output written batch by batch.

Input: a text file (one sentence per line), JSONL, CSV or Parquet (a text
column, ``text`` unless told, and optionally an id column carried through to
the output). Output: ``.npy`` (float32 rows in input order, the header written
first from a count of the input), ``.jsonl`` (one object per line) or
``.parquet`` (one row group per batch; the vector a fixed-size list of float32,
the layout Arrow, Ray, pandas and vector databases read as an embedding column).
Every output is written under a temporary name and renamed only once complete,
so a killed job never leaves a file that looks valid.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from metaeol_edge.errors import InputError
from metaeol_edge.files import atomic_write

OUTPUT_SUFFIXES = (".npy", ".jsonl", ".parquet")
FORMATS = ("text", "jsonl", "csv", "parquet")
PARQUET_BATCH = 1024  # rows read from a Parquet file at a time

Record = tuple[Any, str]
"""(id or None, text) of one input row."""


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


def input_format(path: Path, fmt: str | None = None) -> str:
    """One of :data:`FORMATS`: as given, else by the file's extension (never guessed from its content)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"input format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def iter_records(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
) -> Iterator[Record]:
    """(id, text) of each row of a text, JSONL, CSV or Parquet file, one at a time; text as given (not stripped).

    ``id`` is None without ``id_column``. A text file has no columns: each line
    is a sentence, and an id column is an error. Blank lines at the end of a
    text file are ignored; a blank line with a sentence after it is an error (it
    would be an empty sentence, and rows would no longer match lines). JSONL
    skips blank lines anywhere. An empty or missing text is an error naming its
    row; nothing is skipped silently, so output row i is always input row i.
    """
    path = Path(path)
    kind = input_format(path, fmt)
    if kind == "text" and (text_column != "text" or id_column):
        raise InputError(f"{path} is read as plain text (one sentence per line): it has no columns")
    rows = {"text": _text_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind]
    seen = 0
    for record in rows(path, text_column, id_column):
        seen += 1
        yield record
    if not seen:
        raise InputError(f"{path} holds no sentences")


def _text_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[Record]:
    blank: int | None = None  # the first of a run of blank lines, until a sentence follows it
    for n, line in _lines(path):
        if not line.strip():
            if blank is None:
                blank = n
            continue
        if blank is not None:
            raise InputError(f"{path}, line {blank}: empty or whitespace-only sentence")
        yield None, line


_JSON_ID_KINDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number with a fraction",
                  "numbers with a fraction"), bool: ("a boolean", "booleans")}  # fmt: skip
INT64 = range(-(2**63), 2**63)  # what a Parquet output's integer id column holds


def _check_json_id(where: str, id_column: str, id_: object, kind: type | None) -> type:
    """The type of a JSONL row's id, checked against the earlier rows' (``kind``).

    On the counting pass, before any work: a null, a list or object, or a type
    that changes from row to row used to fail only when the output was written.
    """
    if id_ is None:
        raise InputError(f"{where}: the id {id_column!r} is null; every row needs an id")
    if type(id_) not in _JSON_ID_KINDS:
        raise InputError(f"{where}: the id {id_column!r} is {'an array' if isinstance(id_, list) else 'an object'}; "
                         "an id is a string, a number or a boolean")  # fmt: skip
    if kind is not None and type(id_) is not kind:
        raise InputError(
            f"{where}: the id {id_column!r} is {_JSON_ID_KINDS[type(id_)][0]}, but the ids before it are "
            f"{_JSON_ID_KINDS[kind][1]}; an id column holds one type"
        )
    if type(id_) is int and id_ not in INT64:
        raise InputError(f"{where}: the id {id_column!r} ({id_}) does not fit in 64 bits")
    return type(id_)


def _jsonl_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[Record]:
    id_kind: type | None = None
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(text_column), str):
            raise InputError(f"{path}, line {n}: needs a string {text_column!r} field")
        text = obj[text_column]
        if not text.strip():
            raise InputError(f"{path}, line {n}: empty or whitespace-only {text_column!r}")
        if id_column is None:
            yield None, text
            continue
        if id_column not in obj:
            raise InputError(f"{path}, line {n}: no {id_column!r} field (the id column)")
        id_ = obj[id_column]
        id_kind = _check_json_id(f"{path}, line {n}", id_column, id_, id_kind)
        yield id_, text


def _csv_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # passages can be longer than csv's 128 KB default
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from exc
    with f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            _check_columns(path, header, text_column, id_column)
            for row in reader:
                text = row.get(text_column)
                if text is None:  # a short row
                    raise InputError(f"{path}, line {reader.line_num}: has no {text_column!r} value")
                if not text.strip():
                    raise InputError(f"{path}, line {reader.line_num}: empty or whitespace-only {text_column!r}")
                id_ = row.get(id_column) if id_column is not None else None
                if id_column is not None and id_ is None:  # a short row
                    raise InputError(f"{path}, line {reader.line_num}: has no {id_column!r} value (the id column)")
                yield id_, text
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: invalid UTF-8 near line {reader.line_num + 1} ({exc.reason})") from exc
        except csv.Error as exc:
            raise InputError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from exc


def _check_columns(path: Path, header: list[str], text_column: str, id_column: str | None) -> None:
    for role, name in (("text", text_column), ("id", id_column)):
        if name is not None and name not in header:
            have = ", ".join(repr(h) for h in header) or "none"
            option = "--text-column" if role == "text" else "--id-column"
            raise InputError(f"{path} has no column {name!r} (the {role} column, {option}); its columns: {have}")


def _parquet_rows(path: Path, text_column: str, id_column: str | None) -> Iterator[Record]:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        f = pq.ParquetFile(path)
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc}") from exc
    except pa.ArrowException as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
    schema = f.schema_arrow
    _check_columns(path, schema.names, text_column, id_column)
    text_type = schema.field(text_column).type
    if not _is_text(_value_type(text_type)):
        raise InputError(f"{path}: column {text_column!r} holds {text_type}, not strings")
    if id_column is not None:
        _check_parquet_id_type(path, id_column, schema.field(id_column).type)
    columns = [text_column] + ([id_column] if id_column and id_column != text_column else [])
    row = 0
    try:
        for batch in f.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            texts = batch.column(text_column).to_pylist()
            ids = batch.column(id_column).to_pylist() if id_column else [None] * len(texts)
            for text, id_ in zip(texts, ids, strict=True):
                row += 1
                if text is None or not text.strip():
                    raise InputError(
                        f"{path}, row {row}: {'null' if text is None else 'empty or whitespace-only'} {text_column!r}"
                    )
                if id_ is None and id_column is not None:
                    raise InputError(f"{path}, row {row}: the id {id_column!r} is null; every row needs an id")
                yield id_, text
    except pa.ArrowException as exc:
        raise InputError(f"{path}: cannot read row group after row {row}: {exc}") from exc


def _value_type(arrow_type: Any) -> Any:
    """The type of a column's values: a dictionary-encoded column's dictionary type."""
    import pyarrow as pa

    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def _is_text(arrow_type: Any) -> bool:
    import pyarrow as pa

    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow 16+
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or is_view(arrow_type)


def _check_parquet_id_type(path: Path, id_column: str, arrow_type: Any) -> None:
    """Refuse, before any work, an id column that no output could carry as one value per row.

    Scalars are kept: in a .parquet output as they are, in a .jsonl output as JSON
    (timestamps, dates and times as ISO 8601 strings, decimals as strings, bytes
    as base64: see :func:`json_id`).
    """
    import pyarrow as pa

    t = _value_type(arrow_type)
    binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
    binary = binary or getattr(pa.types, "is_binary_view", lambda t: False)(t)
    scalar = (
        _is_text(t)
        or binary
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_timestamp(t)
        or pa.types.is_date(t)
        or pa.types.is_time(t)
    )
    if not scalar:
        raise InputError(
            f"{path}: the id column {id_column!r} holds {arrow_type}; an id is a string, number, boolean, "
            "decimal, date, time, timestamp or bytes"
        )


def id_arrow_type(path: Path, fmt: str | None, id_column: str | None) -> Any:
    """A Parquet input's id column type (its values' type, if dictionary-encoded), for a Parquet output
    to keep exactly; None for other inputs (their ids' types are inferred from the values)."""
    if id_column is None or input_format(path, fmt) != "parquet":
        return None
    return _value_type(_pyarrow_parquet().ParquetFile(path).schema_arrow.field(id_column).type)


def json_id(value: Any) -> Any:
    """An id that ``json`` cannot write, as JSON: ISO 8601 for a timestamp, date or time (with its time
    zone, and nanoseconds where it has them), the exact digits of a decimal as a string, base64 of bytes."""
    import base64
    import datetime as dt
    import decimal

    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"an id of type {type(value).__name__} cannot be written as JSON")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError('Parquet needs pyarrow: pip install "metaeol-edge[bulk]"') from exc
    return pq


def iter_sentences(path: str | os.PathLike[str], fmt: str | None = None, text_column: str = "text") -> Iterator[str]:
    """The sentences of a text, JSONL, CSV or Parquet file, one at a time, each as given (not stripped)."""
    return (text for _, text in iter_records(path, fmt, text_column))


def count_sentences(
    path: str | os.PathLike[str], fmt: str | None = None, text_column: str = "text", id_column: str | None = None
) -> int:
    """Read the whole input once, checking every row, and count its sentences (before any work)."""
    return sum(1 for _ in iter_records(path, fmt, text_column, id_column))


def read_sentences(path: str | os.PathLike[str], fmt: str | None = None, text_column: str = "text") -> list[str]:
    """All sentences of a file, in a list (for inputs that are small by nature: a fitting corpus)."""
    return list(iter_sentences(path, fmt, text_column))


def check_output(path: str | os.PathLike[str], inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Refuse, before any work, an output that cannot be written or that is one of the inputs.

    The same file under another name (a symbolic or hard link) is the same file:
    writing the output would replace the input.
    """
    out = Path(path)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"output must end in .npy, .jsonl or .parquet, not {out.name!r}")
    if out.suffix.lower() == ".parquet":
        _pyarrow_parquet()
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
    """Writes vectors as they come to ``path`` (.npy, .jsonl or .parquet), complete or not at all.

    ``shape`` is one row's shape ((dim,) or (T, dim)); ``layers`` > 1 writes
    (layers, n, *shape) to .npy and a list of vectors per row to .jsonl and
    .parquet. With ``ids`` each .jsonl/.parquet row carries its input id in
    place of its text (a .npy holds vectors only: rows are in input order).
    """

    def __init__(
        self, path: Path, n: int, shape: tuple[int, ...], layers: int = 1, ids: bool = False, id_type: Any = None
    ) -> None:
        self.path, self.n, self.shape, self.layers, self.ids = path, n, shape, layers, ids
        self.id_type = id_type  # the input's Arrow type of the ids, kept in a .parquet output; None: inferred
        self.kind = path.suffix.lower().lstrip(".")
        if ids and self.kind == "npy":
            raise InputError("a .npy output holds vectors only; write .jsonl or .parquet to keep the ids")
        self._done = 0
        self._parquet: Any = None
        self._context = atomic_write(path)
        try:
            self._f: BinaryIO = self._context.__enter__()
        except OSError as exc:  # name the user's output, not the temporary file beside it
            raise InputError(f"cannot write output {path}: {exc.strerror or exc}") from exc
        if self.kind == "npy":
            full = (layers, n, *shape) if layers > 1 else (n, *shape)
            descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
            header = {"descr": descr, "fortran_order": False, "shape": full}
            np.lib.format.write_array_header_1_0(self._f, header)
            self._data_start = self._f.tell()
            self._row_bytes = int(np.prod(shape)) * 4
            if layers > 1:  # layer blocks are written at their offsets; give the file its full size now
                self._f.truncate(self._data_start + layers * n * self._row_bytes)

    def write(self, texts: list[str], vectors: np.ndarray | list[np.ndarray], ids: list[Any] | None = None) -> None:
        if self.ids and (ids is None or len(ids) != len(texts)):
            raise ValueError("this writer keeps ids: give one per text")
        try:
            self._write(texts, vectors, ids)
        except OSError as exc:  # a full disk, say: name the user's output, not the temporary file
            raise InputError(f"cannot write output {self.path}: {exc.strerror or exc}") from exc

    def _write(self, texts: list[str], vectors: np.ndarray | list[np.ndarray], ids: list[Any] | None) -> None:
        per_layer = vectors if self.layers > 1 else [vectors]
        count = len(texts)
        if self._done + count > self.n:
            raise InputError(f"more rows than the {self.n} counted in the input (did it change while running?)")
        if self.kind == "npy":
            for li, rows in enumerate(per_layer):
                data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
                if self.layers > 1:
                    self._f.seek(self._data_start + (li * self.n + self._done) * self._row_bytes)
                self._f.write(data)
        elif self.kind == "jsonl":
            name, values = ("id", ids) if self.ids else ("text", texts)
            lines = []
            for i, value in enumerate(values):  # type: ignore[arg-type]
                vec = [rows[i].tolist() for rows in per_layer] if self.layers > 1 else per_layer[0][i].tolist()
                lines.append(json.dumps({name: value, "embedding": vec}, default=json_id) + "\n")
            self._f.write("".join(lines).encode("utf-8"))
        else:
            self._write_parquet(texts, per_layer, ids)
        self._done += count

    def _write_parquet(self, texts: list[str], per_layer: list[np.ndarray], ids: list[Any] | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = np.stack(per_layer, axis=1) if self.layers > 1 else per_layer[0]  # (n, [layers,] *shape)
        embedding = _fixed_size_lists(np.ascontiguousarray(rows, dtype=np.float32))
        if self._parquet is None:
            first = pa.array(ids, self.id_type) if self.ids else pa.array(texts, pa.string())
            if self.ids and pa.types.is_null(first.type):
                raise InputError("the id column holds only nulls")
            schema = pa.schema([("id" if self.ids else "text", first.type), ("embedding", embedding.type)])
            self._parquet = pq.ParquetWriter(self._f, schema, compression="zstd")
            self._schema = schema
        schema = self._schema
        try:
            first = pa.array(ids, schema.field(0).type) if self.ids else pa.array(texts, pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"the id column mixes types ({schema.field(0).type} and others): {exc}") from exc
        self._parquet.write_table(pa.Table.from_arrays([first, embedding], schema=schema))

    def __enter__(self) -> VectorWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Finish: the file appears under its name only if no error came and every counted row was written."""
        failure: InputError | None = None
        if self._parquet is not None:
            try:
                self._parquet.close()  # writes the footer into the temporary file
            except OSError as err:
                failure = InputError(f"cannot write output {self.path}: {err.strerror or err}")
        if exc is None and failure is None and self._done != self.n:
            failure = InputError(f"wrote {self._done} of {self.n} rows (did the input change while running?)")
        if exc is None and failure is not None:
            self._context.__exit__(InputError, failure, None)
            raise failure
        try:
            self._context.__exit__(exc_type, exc, tb)
        except OSError as err:  # flushing or renaming into place failed
            raise InputError(f"cannot write output {self.path}: {err.strerror or err}") from err


def _fixed_size_lists(rows: np.ndarray):
    """An Arrow array of nested fixed-size lists of float32, one per row of ``rows`` (n, *shape), no copy."""
    import pyarrow as pa

    array = pa.array(rows.reshape(-1), pa.float32())
    for size in reversed(rows.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def read_vectors(path: str | os.PathLike[str]) -> np.ndarray:
    """The vectors of an output file this module wrote (.npy, .jsonl or .parquet), as one float32 array."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind == ".npy":
        return np.load(path)
    if kind == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return np.array([json.loads(line)["embedding"] for line in f], dtype=np.float32)
    table = _pyarrow_parquet().read_table(path, columns=["embedding"])
    column = table.column("embedding").combine_chunks()
    shape = [len(column)]
    values = column
    while hasattr(values.type, "list_size"):
        shape.append(values.type.list_size)
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(shape)
