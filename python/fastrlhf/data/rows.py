"""The records of a data file, one JSON-like object each: JSONL (one object per line, UTF-8, blank lines
skipped) or Parquet (one object per row, read with pyarrow; a column that is null in a row is left out of
that row's object, so files mixing record kinds work). Errors name the file and the line or row."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike


class FormatError(ValueError):
    """A record that is not valid; `str()` reads `file:line: what is wrong` (`file: row N: ...` for Parquet)."""

    def __init__(self, path: PathLike, line: int, message: str) -> None:
        where = f"{os.fspath(path)}: row {line}" if is_parquet(path) else f"{os.fspath(path)}:{line}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.message = os.fspath(path), line, message


def is_parquet(path: PathLike) -> bool:
    return os.fspath(path).endswith(".parquet")


def iter_objects(path: PathLike) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line or row number from 1, byte offset of the line (-1 for Parquet), object) for every record."""
    if is_parquet(path):
        yield from _parquet_objects(path)
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise FormatError(path, lineno, f"malformed JSON: {e.msg} at column {e.colno}") from None
            if not isinstance(obj, dict):
                raise FormatError(path, lineno, f"expected a JSON object; got {type(obj).__name__}")
            yield lineno, start, obj


def _parquet_objects(path: PathLike) -> Iterator[tuple[int, int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {os.fspath(path)} needs pyarrow: pip install 'fastrlhf[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{os.fspath(path)} is not a readable Parquet file: {e}") from None
    row = 0
    for batch in table.to_batches(max_chunksize=4096):
        for obj in batch.to_pylist():
            row += 1
            yield row, -1, {k: v for k, v in obj.items() if v is not None}
