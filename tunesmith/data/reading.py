"""Read rows from JSON / JSONL files with errors that name the file, the line or row, and the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError


@dataclass
class Row:
    data: dict[str, Any]
    where: str
    """Human-readable location, e.g. `train.jsonl:12` or `train.json: row 3`."""


@dataclass
class ReadResult:
    rows: list[Row]
    skipped: list[str] = field(default_factory=list)
    """One message per bad row skipped under `on_bad_row: skip`."""


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".npy", ".npz")


class BadRow(DataError):
    """A problem with one row; under `on_bad_row: skip` it is counted instead of raised."""


def _utf8_error(path: Path, raw: bytes, exc: UnicodeDecodeError, line_offset: int = 0) -> str:
    line = raw.count(b"\n", 0, exc.start) + 1 + line_offset
    return (
        f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
        "save the file as UTF-8 (most editors offer 'Save with encoding')"
    )


def read_rows(path: str | Path, on_bad_row: str = "error") -> ReadResult:
    """Read a .json (array of objects) or .jsonl (one object per line) file.

    A `.json` file that is not one JSON document but one object per line is read as JSONL.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; data.train_file must name a .json or .jsonl file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"{path}: tunesmith reads data only from .json / .jsonl files; {path.suffix} files are "
                        "Python pickles, which can run arbitrary code when loaded")
    raw = path.read_bytes()
    if raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise DataError(f"{path}: this is a Python pickle, not JSON; refusing to load it (pickles can run code)")
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".json" and raw.lstrip()[:1] == b"[":
        return _read_json_array(path, raw, on_bad_row)
    return _read_jsonl(path, raw, on_bad_row)


def _read_json_array(path: Path, raw: bytes, on_bad_row: str) -> ReadResult:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(_utf8_error(path, raw, exc)) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    result = ReadResult(rows=[])
    for i, item in enumerate(doc, start=1):
        where = f"{path}: row {i}"
        if not isinstance(item, dict):
            _bad(result, on_bad_row, f"{where}: expected a JSON object, got {_kind(item)}")
            continue
        result.rows.append(Row(item, where))
    if not doc:
        raise DataError(f"{path}: the JSON array is empty")
    return result


def _read_jsonl(path: Path, raw: bytes, on_bad_row: str) -> ReadResult:
    result = ReadResult(rows=[])
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad(result, on_bad_row, _utf8_error(path, line, exc, lineno - 1))
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (is this a .json array saved as .jsonl?)" if lineno == 1 and text.lstrip().startswith("[") else ""
            _bad(result, on_bad_row, f"{where}: invalid JSON at column {exc.colno}: {exc.msg}{hint}")
            continue
        if not isinstance(item, dict):
            _bad(result, on_bad_row, f"{where}: expected a JSON object, got {_kind(item)}")
            continue
        result.rows.append(Row(item, where))
    return result


def _bad(result: ReadResult, on_bad_row: str, message: str) -> None:
    if on_bad_row != "skip":
        raise BadRow(message + "\n  (set data.on_bad_row: skip to skip such rows and count them in the report)")
    result.skipped.append(message)


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
