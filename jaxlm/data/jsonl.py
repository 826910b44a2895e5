"""JSON Lines files of records, each checked as it is read: a bad line is an error naming file and line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jaxlm.data.sources import json_records
from jaxlm.errors import DataError


def read_records(path: str | Path, check: Callable[[object, str], dict], kind: str, items: str) -> list[dict]:
    """`check(record, "file:line")` of every non-blank line; DataError for unreadable files, invalid UTF-8 or
    JSON, and files without records. kind, items: what the file and its records are called in messages."""
    path = Path(path).expanduser()
    if not path.is_file():
        why = "not a file" if path.exists() else "No such file or directory"
        raise DataError(f"cannot read {kind} file {path}: {why}")
    out = []
    for where, record in json_records(path):  # .jsonl, .jsonl.gz or .jsonl.zst, as corpora (jaxlm.data.sources)
        if isinstance(record, ValueError):
            raise DataError(f"{where}: {record}")
        out.append(check(record, where))
    if not out:
        raise DataError(f"{kind} file {path} holds no {items}")
    return out
