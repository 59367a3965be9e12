"""Read rows from JSON / JSONL files with errors that name the file, the line or row, and the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
"""Plain documents: each file is one text row (for continued pre-training); a folder gives all of its own."""


class BadRow(DataError):
    """A problem with one row; under `on_bad_row: skip` it is counted instead of raised."""


def _utf8_error(path: Path, raw: bytes, exc: UnicodeDecodeError, line_offset: int = 0) -> str:
    line = raw.count(b"\n", 0, exc.start) + 1 + line_offset
    return (
        f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
        "save the file as UTF-8 (most editors offer 'Save with encoding')"
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; data.train_file must name a .json or .jsonl file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"{path}: tunesmith reads data only from .json / .jsonl files; {path.suffix} files are "
                        "Python pickles, which can run arbitrary code when loaded")
    with path.open("rb") as f:
        head = f.read(4096)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise DataError(f"{path}: this is a Python pickle, not JSON; refusing to load it (pickles can run code)")


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return path.suffix.lower() == ".json" and head[:1] == b"["


def iter_rows(path: str | Path, on_bad_row: str = "error", skipped: list[str] | None = None) -> Iterator[Row]:
    """Rows of a .jsonl file, one line at a time (memory does not grow with the file), or of a .json array.

    A `.json` file that is not one JSON array but one object per line is read as JSONL. Bad rows raise
    BadRow, or with `on_bad_row="skip"` are appended to `skipped` and left out.
    """
    path = Path(path)
    skipped = skipped if skipped is not None else []
    if path.is_dir() or path.suffix.lower() in TEXT_SUFFIXES:
        yield from _read_documents(path, on_bad_row, skipped)
        return
    _check_file(path)
    if _is_json_array(path):  # one JSON document has to be parsed whole; large data belongs in JSONL
        yield from _read_json_array(path, on_bad_row, skipped)
        return
    any_content = False
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            any_content = True
            row = _parse_line(path, lineno, line, on_bad_row, skipped)
            if row is not None:
                yield row
    if not any_content:
        raise DataError(f"{path}: the file is empty")


def document_files(path: Path) -> list[Path]:
    """The documents a text file or a folder holds, in a fixed order (sorted paths, sub-folders included)."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{path} is a folder with no {'/'.join(TEXT_SUFFIXES)} files; data.train_file names a "
                        ".json or .jsonl file, a text document, or a folder of them")
    return files


def _read_documents(path: Path, on_bad_row: str, skipped: list[str]) -> Iterator[Row]:
    for file in document_files(path):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad(skipped, on_bad_row, _utf8_error(file, raw, exc))
            continue
        yield Row({"text": text}, str(file))


def read_rows(path: str | Path, on_bad_row: str = "error") -> ReadResult:
    """All rows of a file at once (for small files: val/test sets, evaluation data)."""
    skipped: list[str] = []
    rows = list(iter_rows(path, on_bad_row, skipped))
    return ReadResult(rows=rows, skipped=skipped)


def _read_json_array(path: Path, on_bad_row: str, skipped: list[str]) -> Iterator[Row]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(_utf8_error(path, raw, exc)) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not doc:
        raise DataError(f"{path}: the JSON array is empty")
    for i, item in enumerate(doc, start=1):
        where = f"{path}: row {i}"
        if not isinstance(item, dict):
            _bad(skipped, on_bad_row, f"{where}: expected a JSON object, got {_kind(item)}")
            continue
        yield Row(item, where)


def _parse_line(path: Path, lineno: int, line: bytes, on_bad_row: str, skipped: list[str]) -> Row | None:
    where = f"{path}:{lineno}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        _bad(skipped, on_bad_row, _utf8_error(path, line, exc, lineno - 1))
        return None
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (is this a .json array saved as .jsonl?)" if lineno == 1 and text.lstrip().startswith("[") else ""
        _bad(skipped, on_bad_row, f"{where}: invalid JSON at column {exc.colno}: {exc.msg}{hint}")
        return None
    if not isinstance(item, dict):
        _bad(skipped, on_bad_row, f"{where}: expected a JSON object, got {_kind(item)}")
        return None
    return Row(item, where)


def _bad(skipped: list[str], on_bad_row: str, message: str) -> None:
    if on_bad_row != "skip":
        raise BadRow(message + "\n  (set data.on_bad_row: skip to skip such rows and count them in the report)")
    skipped.append(message)


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
