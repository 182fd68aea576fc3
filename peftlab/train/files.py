"""Reading rows from CSV, TSV, JSONL and JSON files with clear errors, and turning raw labels into
a stable label vocabulary."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peftlab.train.examples import DataError, Label, TaskKind

KindRequest = Literal["auto", "classification", "regression"]
SUPPORTED_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class RawRecord:
    """One row before normalisation: where it came from, its texts, and its label as read."""

    where: str
    texts: tuple[Any, ...]
    label: Any


def read_rows(path: Path, header: bool = True) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Read ``path`` by its extension into (column names, rows); each row is (location, mapping).

    ``.tsv`` is read with ``csv.QUOTE_NONE`` (GLUE style), ``.csv`` with ordinary CSV quoting,
    ``.jsonl`` one JSON object a line, ``.json`` a JSON array of objects (or JSON lines).
    ``header=False`` (CSV/TSV only, e.g. GLUE's CoLA) takes every line as data and names the
    columns by their 0-based position, ``"0"``, ``"1"``, ...
    A byte-order mark is skipped. Raises :class:`DataError` on a missing, empty or unparsable file,
    or one whose content is plainly another format than its extension says.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise DataError(f"{path} is empty")
    if not header and suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: --no-header applies to .csv and .tsv files; a {suffix} file names its fields")
    check_format(path, suffix, text)
    if suffix in (".csv", ".tsv"):
        columns, rows = _read_delimited(path, text, tab=suffix == ".tsv", header=header)
    elif suffix == ".json" and text.lstrip().startswith("["):
        columns, rows = _read_json_array(path, text)
    else:
        columns, rows = _read_json_lines(path, text)
    if not rows:
        raise DataError(f"{path} has no data rows")
    return columns, rows


def check_format(path: Path, suffix: str, text: str) -> None:
    """:class:`DataError` when the text is plainly not what ``suffix`` says: JSON in a .csv/.tsv,
    delimited text in a .json/.jsonl, a .tsv without a tab in its first line."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    looks_json = first.lstrip()[:1] in ("{", "[")
    if suffix in (".csv", ".tsv") and looks_json:
        raise DataError(f"{path}: the file holds JSON, not {suffix[1:].upper()} (first line starts with "
                        f"{first.lstrip()[:1]!r}); give it a .jsonl (one object a line) or .json name")
    if suffix in (".json", ".jsonl") and not looks_json:
        raise DataError(f"{path}: not JSON: the first line starts with {first.strip()[:20]!r}, where a {suffix} "
                        "file starts with '{' or '['; a delimited text file needs a .csv or .tsv name")
    if suffix == ".tsv" and "\t" not in first and "," in first:
        raise DataError(f"{path}: no tab in the first line but commas: this looks like CSV; give it a .csv name")


def _read_delimited(path: Path, text: str, tab: bool,
                    header: bool = True) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    stream = io.StringIO(text, newline="")
    if tab:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream)
    rows: list[tuple[str, dict[str, Any]]] = []
    like = "the header" if header else "the first line"
    try:
        first = next(reader)
        columns = [name.strip() for name in first] if header else [str(i) for i in range(len(first))]
        if not header:
            rows.append((f"{path}:{reader.line_num}", dict(zip(columns, first))))
        for fields in reader:
            if not fields:
                continue
            where = f"{path}:{reader.line_num}"
            if len(fields) != len(columns):
                raise DataError(f"{where}: expected {len(columns)} fields like {like}, "
                                f"found {len(fields)}")
            rows.append((where, dict(zip(columns, fields))))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: cannot parse line ({err})") from err
    return columns, rows


def _json_row(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _columns_of(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _read_json_lines(path: Path, text: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
        rows.append((where, _json_row(where, value)))
    return _columns_of(rows), rows


def _read_json_array(path: Path, text: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    rows = [(f"{path}[{i}]", _json_row(f"{path}[{i}]", item)) for i, item in enumerate(items)]
    return _columns_of(rows), rows


def pick_columns(
    path: Path | str,
    columns: Sequence[str],
    rows: list[tuple[str, dict[str, Any]]],
    text_cols: Sequence[str],
    label_col: str,
) -> list[RawRecord]:
    """The text and label columns of each row; :class:`DataError` names a missing column and
    lists the columns that exist."""
    if not 1 <= len(text_cols) <= 2:
        raise DataError(f"give one or two text columns, not {len(text_cols)}: {list(text_cols)}")
    for name in [*text_cols, label_col]:
        if name not in columns:
            raise DataError(f"{path}: no column {name!r}; {describe_columns(columns, rows)}")
    records = []
    for where, row in rows:
        missing = [name for name in (*text_cols, label_col) if name not in row]
        if missing:
            raise DataError(f"{where}: row has no {missing[0]!r} field")
        records.append(RawRecord(where, tuple(row[c] for c in text_cols), row[label_col]))
    return records


def describe_columns(columns: Sequence[str], rows: list[tuple[str, dict[str, Any]]]) -> str:
    """"columns are: a, b" for a file with a header; for a headerless file (columns named 0, 1, ...)
    the positions with the first row's values, e.g. "columns are 0..3: 0='gj04', 1='1', ..."."""
    if columns and all(c == str(i) for i, c in enumerate(columns)) and rows:
        first = rows[0][1]
        shown = ", ".join(f"{c}={str(first.get(c, ''))[:30]!r}" for c in columns)
        return f"columns are 0..{len(columns) - 1} (no header; first row {shown})"
    hint = ("; if the file has no header row, use --no-header and column numbers"
            if any(_looks_like_data(c) for c in columns) else "")
    return f"columns are: {', '.join(columns)}{hint}"


def _looks_like_data(name: str) -> bool:
    """A header cell that is empty, a number or a long sentence is likely a data row's field."""
    text = name.strip()
    return not text or bool(_FLOAT_RE.match(text)) or len(text.split()) > 4


def clean_texts(record: RawRecord) -> tuple[str, ...]:
    """The record's texts as stripped strings; :class:`DataError` on a missing (null) text."""
    out = []
    for value in record.texts:
        if value is None:
            raise DataError(f"{record.where}: text is missing (null)")
        out.append(str(value).strip())
    return tuple(out)


def _coerce(value: Any, where: str) -> bool | int | float | str:
    """Parse one raw label: JSON scalars stay as they are, strings become bool/int/float when
    they spell one, else the stripped string."""
    if isinstance(value, (bool, int, float)):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: label is empty")
    if not isinstance(value, str):
        raise DataError(f"{where}: label must be a string, number or boolean, "
                        f"not {type(value).__name__}")
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    return text


def _name_of(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_labels(
    raw: Sequence[tuple[str, Any]],
    kind: KindRequest = "auto",
    label_names: Sequence[str] | None = None,
) -> tuple[list[Label], list[str], TaskKind]:
    """Turn raw labels ``(location, value)`` into (labels, label names, kind).

    Classification vocabulary: booleans map False→0, True→1; numbers keep numeric order; strings
    sort alphabetically. With ``label_names`` given (e.g. the train split's) those ids are used
    and an unseen label is an error. Floats become a regression target when ``kind`` is
    "regression", or when ``kind`` is "auto" and some value is not integral.
    """
    values = [_coerce(value, where) for where, value in raw]
    if kind == "regression" or (
        kind == "auto" and all(_is_number(v) for v in values)
        and any(isinstance(v, float) and not v.is_integer() for v in values)
    ):
        for (where, _), value in zip(raw, values):
            if not _is_number(value):
                raise DataError(f"{where}: regression label {value!r} is not a number")
        return [float(v) for v in values], [], "regression"
    if kind not in ("auto", "classification"):
        raise DataError(f"kind must be auto, classification or regression, not {kind!r}")
    names = [_name_of(v) for v in values]
    if label_names is None:
        if all(isinstance(v, bool) for v in values):
            vocab = ["False", "True"]
        elif all(_is_number(v) for v in values):
            by_name = {_name_of(v): float(v) for v in values}
            vocab = sorted(by_name, key=by_name.__getitem__)
        else:
            vocab = sorted(set(names))
    else:
        vocab = list(label_names)
    index = {name: i for i, name in enumerate(vocab)}
    labels: list[Label] = []
    for (where, _), name in zip(raw, names):
        if name not in index:
            raise DataError(f"{where}: label {name!r} is not one of {', '.join(vocab)}")
        labels.append(index[name])
    return labels, vocab, "classification"
