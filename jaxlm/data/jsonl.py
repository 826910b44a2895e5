"""JSON Lines files of records, each checked as it is read: a bad line is an error naming file and line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from jaxlm.errors import DataError


def read_records(path: str | Path, check: Callable[[object, str], dict], kind: str, items: str) -> list[dict]:
    """`check(record, "file:line")` of every non-blank line; DataError for unreadable files, invalid UTF-8 or
    JSON, and files without records. kind, items: what the file and its records are called in messages."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {kind} file {path}: {e.strerror}") from None
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None
        out.append(check(record, where))
    if not out:
        raise DataError(f"{kind} file {path} holds no {items}")
    return out
