"""Text corpora as streams of documents, from the formats researchers keep them in, never whole in memory.

A source is a file, a directory (every file under it) or a glob. Each file's kind comes from its name:
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (also `.json.gz`, `.ndjson`): one JSON object a line, its `text_field`;
- `.parquet`: the `text_field` column (pyarrow);
- `.arrow`: Arrow IPC files, as Hugging Face `datasets` writes them (`save_to_disk`): the `text_field` column.
  A directory that `save_to_disk` wrote (`dataset_info.json` or `dataset_dict.json` in it) is read as its
  `.arrow` files, without the JSON metadata beside them;
- anything else: UTF-8 text, one document a file (invalid bytes become U+FFFD, with a warning).

Validation is held out as whole files when there are several (from the end of the sorted list, until they
reach `val_fraction` of the bytes on disk), else as the end of the one file: its last `val_fraction` of bytes
cut at a line break (text), or its last `val_fraction` of records (at least one).

`pieces(part)` yields (text, ends_document): a text file larger than `TEXT_PIECE` comes in line-aligned
pieces of one document, so that no document needs to fit in memory and the pieces tokenize in parallel;
smaller files are one piece.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from jaxlm.errors import DataError

log = logging.getLogger(__name__)

TEXT_PIECE = 1 << 20  # bytes of a text file read at a time: the pieces of a large file tokenize in parallel
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".json.gz", ".json.zst", ".ndjson")


def kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_JSONL):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "text"


@dataclasses.dataclass(frozen=True)
class Part:
    """A file, or the range [lo, hi) of it: bytes of a text file, records of the others (hi None: to the end)."""

    path: Path
    kind: str
    size: int  # bytes on disk
    lo: int = 0
    hi: int | None = None


def source_files(source: str) -> list[Part]:
    """The files of a source (file, directory or glob), sorted; DataError when there are none."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-1:]))
        if any((path / m).is_file() for m in HF_MARKERS) or any(p.name == "dataset_dict.json" for p in files):
            files = [p for p in files if kind_of(p) == "arrow" and not p.name.startswith("cache-")]
        if not files:
            raise DataError(f"data directory {path} holds no files")
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(
                f"data source {source!r} is neither the embedded corpus, a file, a directory nor a glob that "
                "matches files"
            )
    parts = []
    for p in files:
        try:
            parts.append(Part(p, kind_of(p), p.stat().st_size))
        except OSError as e:
            raise DataError(f"cannot read data file {p}: {e.strerror}") from None
    if sum(p.size for p in parts) == 0:
        raise DataError(f"data source {source!r} is empty")
    return parts


def split_parts(parts: list[Part], val_fraction: float, text_field: str = "text") -> tuple[list[Part], list[Part]]:
    """(training parts, validation parts): whole files from the end, or the end of the one file."""
    total = sum(p.size for p in parts)
    if len(parts) > 1:
        train, val, held = list(parts), [], 0
        while held < val_fraction * total and len(train) > 1:
            p = train.pop()
            val.insert(0, p)
            held += p.size
        return train, val
    (p,) = parts
    if p.kind == "text":
        cut = int(p.size * (1 - val_fraction))
        with _open_bytes(p.path) as f:  # the last line break before the cut, if it is in the second half
            f.seek(max(0, cut - TEXT_PIECE))
            head = f.read(cut - max(0, cut - TEXT_PIECE))
        newline = head.rfind(b"\n")
        newline = newline + max(0, cut - TEXT_PIECE) if newline >= 0 else -1
        cut = newline + 1 if newline > p.size // 2 else cut
        return [dataclasses.replace(p, hi=cut)], [dataclasses.replace(p, lo=cut)]
    n = count_records(p, text_field)
    n_val = max(1, int(n * val_fraction))
    if n_val >= n:
        raise DataError(
            f"{p.path} has {n} record(s): too few to hold out validation; raise its size or use a directory"
        )
    return [dataclasses.replace(p, hi=n - n_val)], [dataclasses.replace(p, lo=n - n_val)]


def fingerprint(parts: list[Part]) -> str:
    """What identifies a source's content without reading it all: each file's path, size, modification time
    and a hash of its first and last 64 KiB."""
    h = hashlib.sha256()
    for p in parts:
        st = p.path.stat()
        h.update(f"{p.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{p.lo}\0{p.hi}\0".encode())
        with open(p.path, "rb") as f:
            h.update(f.read(1 << 16))
            if st.st_size > 1 << 16:
                f.seek(max(1 << 16, st.st_size - (1 << 16)))
                h.update(f.read())
    return h.hexdigest()


class BadRecords:
    """Counts malformed records (skipped with a warning naming file and line) up to `limit`, then fails."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def skip(self, where: str, why: str) -> None:
        self.count += 1
        if self.count > self.limit:
            raise DataError(f"{where}: {why}; more than data.max_bad_records={self.limit} malformed records, stopping")
        log.warning("%s: %s (skipped)", where, why)


def pieces(part: Part, text_field: str = "text", bad: BadRecords | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) of every document of a part, in order."""
    bad = bad or BadRecords(0)
    if part.kind == "text":
        yield from _text_pieces(part)
    else:
        for text in records(part, text_field, bad):
            yield text, True


def records(part: Part, text_field: str, bad: BadRecords) -> Iterator[str]:
    """The `text_field` of every record in [lo, hi) of a JSONL, Parquet or Arrow file."""
    read = {"jsonl": _jsonl, "parquet": _parquet, "arrow": _arrow}[part.kind]
    for i, text in enumerate(read(part.path, text_field, bad)):
        if part.hi is not None and i >= part.hi:
            return
        if i >= part.lo:
            yield text


def count_records(part: Part, text_field: str = "text") -> int:
    if part.kind == "parquet":
        return _parquet_file(part.path).metadata.num_rows
    if part.kind == "arrow":
        return sum(b.num_rows for b in _arrow_batches(part.path, None))
    return sum(1 for _, line in lines(part.path) if line.strip())


def _open_bytes(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d); invalid bytes become U+FFFD", where, e.start)
        return data.decode("utf-8", errors="replace")


def _text_pieces(part: Part) -> Iterator[tuple[str, bool]]:
    end = part.size if part.hi is None else part.hi
    with _open_bytes(part.path) as f:
        f.seek(part.lo)
        pos, carry = part.lo, b""
        while True:
            n = min(TEXT_PIECE, end - pos)
            data, pos = carry + f.read(n), pos + n
            last = pos >= end
            carry = b""
            if not last:  # cut after the last line break that a non-space follows (see _cut)
                nl = _cut(data)
                if nl < 0 and len(data) < 64 * TEXT_PIECE:  # no such line break yet: read on
                    carry = data
                    continue
                if nl < 0:  # a line of over 64 pieces: cut at a character boundary (UTF-8 lead byte)
                    nl = next(i for i in range(len(data) - 1, -1, -1) if data[i] & 0xC0 != 0x80) - 1
                data, carry = data[: nl + 1], data[nl + 1 :]
            yield _decode(data, str(part.path)), last
            if last:
                return


def _cut(data: bytes) -> int:
    """The last line break between two non-whitespace bytes. Byte-level BPE (GPT-2's pre-tokenizer) makes such
    a line break a piece of its own, so tokenizing the two sides apart gives the same ids, and trains the same
    BPE, as tokenizing them together (and UTF-8 never has 0x0A inside a character); other tokenizers may
    differ at such a joint."""
    nl = data.rfind(b"\n")
    while nl >= 0 and (nl < 1 or nl + 1 >= len(data) or data[nl - 1 : nl].isspace() or data[nl + 1 : nl + 2].isspace()):
        nl = data.rfind(b"\n", 0, nl)
    return nl


def _open_text_stream(path: Path):
    """A binary line stream of a JSONL file, decompressing .gz and .zst as it reads."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return gzip.open(path, "rb")
        if name.endswith((".zst", ".zstd")):
            return io.BufferedReader(_Zstd(path), 1 << 20)
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


class _Zstd(io.RawIOBase):
    """A .zst file's bytes, frame after frame; EOFError when it ends inside a frame (zstandard's own stream
    reader ends quietly there, which would drop a truncated file's tail without a word)."""

    def __init__(self, path: Path):
        import zstandard

        self._new = zstandard.ZstdDecompressor().decompressobj
        self._file, self._d, self._buf, self._started = open(path, "rb"), None, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._d.unused_data if self._d is not None and self._d.eof else b""
            if not data:
                data = self._file.read(1 << 20)
                if not data:
                    if self._d is not None and not self._d.eof:
                        raise EOFError("compressed file ended inside a frame")
                    return 0
            if self._d is None or self._d.eof:
                self._d = self._new()
            self._buf = self._d.decompress(data)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL file; a truncated or corrupt .gz / .zst is a DataError naming it."""
    with _open_text_stream(path) as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                yield n, line
        except Exception as e:  # gzip: OSError / EOFError; zstandard: its ZstdError
            if not isinstance(e, (OSError, EOFError)) and type(e).__name__ != "ZstdError":
                raise
            raise DataError(f"{path}: cannot decompress after line {n}: {e}") from None


def json_records(path: Path) -> Iterator[tuple[str, object]]:
    """("file:line", record) of every non-blank line of a JSONL file; a line that is not a record comes as a
    ValueError saying why (callers skip it or raise)."""
    for n, line in lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            record = ValueError(f"not valid UTF-8 (byte {e.start})")
        except json.JSONDecodeError as e:
            record = ValueError(f"not valid JSON: {e.msg} at column {e.colno}")
        yield f"{path}:{n}", record


def _jsonl(path: Path, text_field: str, bad: BadRecords) -> Iterator[str]:
    for where, record in json_records(path):
        if isinstance(record, ValueError):
            bad.skip(where, str(record))
            yield ""  # a record still: the split positions count it
        else:
            yield _field(record, text_field, where)


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no {text_field!r} field (data.text_field); the record has {keys}")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_field!r} is {type(text).__name__}, not a string")
    return text


def _column(schema, path: Path, text_field: str) -> None:
    if text_field not in schema.names:
        raise DataError(f"{path}: no {text_field!r} column (data.text_field); its columns are {schema.names}")


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _parquet(path: Path, text_field: str, bad: BadRecords) -> Iterator[str]:
    import pyarrow as pa

    f = _parquet_file(path)
    _column(f.schema_arrow, path, text_field)
    try:
        for batch in f.iter_batches(batch_size=4096, columns=[text_field]):
            yield from _texts(batch.column(0).to_pylist(), path, text_field)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def _arrow_batches(path: Path, text_field: str | None):
    import pyarrow as pa

    try:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # the streaming format, as `datasets` writes
            schema, batches = reader.schema, iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))  # the random-access file format
            schema = reader.schema
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Arrow file: {e}") from None
    if text_field is not None:
        _column(schema, path, text_field)
    try:
        yield from batches
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def _arrow(path: Path, text_field: str, bad: BadRecords) -> Iterator[str]:
    for batch in _arrow_batches(path, text_field):
        yield from _texts(batch.column(text_field).to_pylist(), path, text_field)


def _texts(values: list, path: Path, text_field: str) -> Iterator[str]:
    for v in values:
        if v is None:
            yield ""
        elif isinstance(v, str):
            yield v
        else:
            raise DataError(f"{path}: column {text_field!r} holds {type(v).__name__}, not strings")
