"""Prepare once: a corpus tokenized into memory-mapped token files, read by every later run without re-reading text.

    prepared = prepare(source, out_dir, tokenizer)   # streams the source; resumable; atomic
    prepared.tokens("train")                         # np.memmap of token ids (uint16, or uint32 past 65,536 ids)

A prepared directory holds, per split (`train`, `val`):
- `{split}.tokens`: every document's ids followed by end-of-text, one stream (what `PackedLoader` windows);
- `{split}.ends`: int64 offsets where each document ends (after its end-of-text);
plus `tokenizer.json` and `index.json` (format, dtype, token/document/byte counts, the source's fingerprint and
the tokenizer's hash). It is built in `OUT.partial/` and renamed to OUT at the end, so a directory with an
index is complete; an interrupted prepare resumes from its last committed chunk (`progress.json`), and its files
equal an uninterrupted run's (chunks are cut at the same documents).

Tokenization runs over all cores: `tokenizers`' batch encoding (Rust threads) of chunks of `CHUNK_BYTES`.
`ensure_prepared` keeps prepared corpora in a cache (`data.cache_dir`, default `~/.cache/jaxlm/data`), keyed
by the source's fingerprint, the split and the tokenizer, so `jaxlm train` on a raw source tokenizes it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxlm.data.corpus import EMBEDDED, VAL_WORKS, embedded_works
from jaxlm.data.sources import BadRecords, Part, fingerprint, pieces, source_files, split_parts
from jaxlm.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer
from jaxlm.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "jaxlm-tokens/1"
SPLITS = ("train", "val")
CHUNK_BYTES = 8 << 20  # text tokenized in one batch-encoding call, and committed at once


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A corpus as the settings that decide its documents and split (a config's `data` section has them)."""

    source: str
    val_fraction: float = 0.05
    text_field: str = "text"
    max_bad_records: int = 100

    def splits(self) -> dict[str, list[Part] | list[str]]:
        """{split: its file parts}, or for the embedded corpus {split: [work names]}."""
        if self.source == EMBEDDED:
            names = list(embedded_works())
            return {"train": [n for n in names if n not in VAL_WORKS], "val": list(VAL_WORKS)}
        train, val = split_parts(source_files(self.source), self.val_fraction, self.text_field)
        return {"train": train, "val": val}

    def fingerprint(self) -> str:
        if self.source == EMBEDDED:
            from importlib import resources

            data = resources.files("jaxlm.data").joinpath("shakespeare.tar.xz").read_bytes()
            return "embedded:" + hashlib.sha256(data).hexdigest()
        return fingerprint(source_files(self.source))

    def size(self, parts) -> int:
        """Bytes on disk of a split's parts (an estimate for compressed files and record ranges)."""
        if self.source == EMBEDDED:
            works = embedded_works()
            return sum(len(works[n].encode()) for n in parts)
        return sum(((p.hi if p.hi is not None else p.size) - p.lo) if p.kind == "text" else p.size for p in parts)

    def pieces(self, parts, bad: BadRecords) -> Iterator[tuple[str, bool]]:
        if self.source == EMBEDDED:
            works = embedded_works()
            for n in parts:
                yield works[n], True
            return
        for part in parts:
            yield from pieces(part, self.text_field, bad)


def tokenizer_sha(tokenizer: Tokenizer) -> str:
    """A hash of what the tokenizer's files hold (the same ids for the same text)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(Path(d) / "tokenizer.json")
        h = hashlib.sha256()
        for f in sorted(Path(d).iterdir()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def sample_texts(text: TextSource, sample_mb: float) -> Iterator[str]:
    """A bounded, deterministic sample of the training split to train a tokenizer on: every piece when the
    split is at most `sample_mb` MB, else every k-th piece (k = split / sample, so spread over the whole split),
    stopping at `sample_mb`; never empty."""
    parts = text.splits()["train"]
    budget = int(sample_mb * 2**20)
    rate = min(1.0, budget / max(1, text.size(parts)))
    taken, first = 0, None
    for i, (piece, _) in enumerate(text.pieces(parts, BadRecords(text.max_bad_records))):
        first = piece if first is None else first
        if int((i + 1) * rate) == int(i * rate):
            continue
        yield piece
        taken += len(piece)
        if rate < 1.0 and taken >= budget:
            return
    if not taken and first:
        yield first


def train_tokenizer(
    texts: TextSource | list[tuple[TextSource, float]], kind: str, vocab_size: int, *, mask=False, sample_mb=256.0
) -> Tokenizer:
    """`data.tokenizer` (bpe | byte) for one corpus or several by weight: a BPE trained on `sample_mb` MB of
    `sample_texts`, each corpus's share of it by weight."""
    if kind == "byte":
        return ByteTokenizer(mask)
    texts = [(texts, 1.0)] if isinstance(texts, TextSource) else texts
    total = sum(w for _, w in texts)
    t = time.perf_counter()
    sample = (piece for text, w in texts for piece in sample_texts(text, sample_mb * w / total))
    tokenizer = build_tokenizer(kind, sample, vocab_size, mask)
    log.info(
        "trained a %d-token BPE on a %g MB sample in %.1f s", tokenizer.vocab_size, sample_mb, time.perf_counter() - t
    )
    return tokenizer


@dataclasses.dataclass
class Prepared:
    """A prepared directory: its index, its tokenizer and its token streams (memory-mapped)."""

    path: Path
    index: dict
    tokenizer: Tokenizer

    def tokens(self, split: str = "train") -> np.ndarray:
        return self._map(split, "tokens", self.index["dtype"], self.index["splits"][split]["tokens"])

    def ends(self, split: str = "train") -> np.ndarray:
        return self._map(split, "ends", "int64", self.index["splits"][split]["documents"])

    def _map(self, split: str, what: str, dtype: str, count: int) -> np.ndarray:
        path = self.path / f"{split}.{what}"
        want = count * np.dtype(dtype).itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != want:
            raise DataError(
                f"prepared data {path} is {'missing' if size < 0 else f'{size} bytes'}, its index says {want}: "
                "the directory is damaged; prepare it again"
            )
        if count == 0:
            return np.zeros((0,), dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / "index.json").is_file()


def open_prepared(path: str | Path) -> Prepared:
    path = Path(path).expanduser()
    try:
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} is not a prepared data directory (no index.json; `jaxlm data prepare` makes one)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}/index.json is unreadable: {e}") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path}/index.json is format {index.get('format')!r}, this jaxlm reads {FORMAT!r}")
    return Prepared(path, index, load_tokenizer(path / "tokenizer.json"))


def prepare(
    text: TextSource, out: str | Path, tokenizer: Tokenizer, *, progress: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> Prepared:
    """Tokenizes `text` into `out` (see the module doc); returns it opened. An existing complete `out` is
    returned as it is when it holds this source and tokenizer, else a DataError."""
    out = Path(out).expanduser()
    want = {"source": text.source, "fingerprint": text.fingerprint(), "tokenizer_sha256": tokenizer_sha(tokenizer),
            "val_fraction": text.val_fraction, "text_field": text.text_field}  # fmt: skip
    if is_prepared(out):
        prepared = open_prepared(out)
        if {k: prepared.index.get(k) for k in want} != want:
            raise DataError(f"{out} is already prepared, from another source or tokenizer; choose another --out")
        return prepared
    work = out.with_name(out.name + ".partial")
    progress_file = work / "progress.json"
    try:
        done = json.loads(progress_file.read_text())
    except (OSError, json.JSONDecodeError):
        done = {}
    if done.get("want") != want:  # nothing to resume, or a partial prepare of something else: start over
        if work.exists():
            log.warning("%s holds no resumable prepare of this source and tokenizer: starting over", work)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        tokenizer.save(work / "tokenizer.json")
        done = {"want": want}
    else:
        log.info("resuming the prepare in %s", work)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    bad = BadRecords(text.max_bad_records)
    t0 = time.perf_counter()
    splits = text.splits()
    counts = {}
    for split in SPLITS:
        counts[split] = _write_split(
            text, splits[split], tokenizer, dtype, work, split, done, progress_file, bad, progress, chunk_bytes
        )
    if counts["val"]["tokens"] < 2:
        raise DataError(f"data source {text.source!r} leaves no validation text; raise data.val_fraction")
    index = {
        "format": FORMAT,
        **want,
        "dtype": dtype.name,
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "splits": counts,
        "bad_records_skipped": bad.count,
        "prepare_s": round(time.perf_counter() - t0, 2),
    }
    (work / "index.json").write_text(json.dumps(index, indent=1))
    progress_file.unlink()
    if out.exists():  # an empty or stale target (never a complete one: that returned above)
        shutil.rmtree(out)
    os.replace(work, out)
    log.info("prepared %s: %s train tokens in %.1f s", out, f"{counts['train']['tokens']:,}", index["prepare_s"])
    return open_prepared(out)


def _write_split(text, parts, tokenizer, dtype, work, split, done, progress_file, bad, progress, chunk_bytes) -> dict:
    """Appends the split's chunks after the last committed one; returns its counts."""
    state = done.get(split, {"pieces": 0, "tokens": 0, "documents": 0, "bytes": 0})
    paths = {k: work / f"{split}.{k}" for k in ("tokens", "ends")}
    for k, n in (("tokens", state["tokens"] * dtype.itemsize), ("ends", state["documents"] * 8)):
        with open(paths[k], "ab") as f:  # drop whatever was written after the last commit
            f.truncate(n)
    if state.get("complete"):
        return {k: state[k] for k in ("tokens", "documents", "bytes")}
    from tqdm.auto import tqdm

    bar = tqdm(total=text.size(parts), unit="B", unit_scale=True, desc=f"prepare {split}", disable=not progress)
    bar.update(state["bytes"])
    stream = text.pieces(parts, bad)
    for _ in range(state["pieces"]):  # skip what earlier runs committed (reading is cheap, tokenizing is not)
        next(stream)
    with open(paths["tokens"], "ab") as ftok, open(paths["ends"], "ab") as fends:
        batch, size = [], 0
        for piece in _then_none(stream):
            if piece is not None:
                batch.append(piece)
                size += len(piece[0])
                if size < chunk_bytes:
                    continue
            if batch:
                arrays, ends, n = [], [], state["tokens"]
                for (_, end), row in zip(batch, _encode(tokenizer, [t for t, _ in batch], dtype)):
                    arrays.append(row)
                    n += len(row)
                    if end:
                        arrays.append(np.asarray([tokenizer.eos_id], dtype))
                        n += 1
                        ends.append(n)
                ftok.write(np.concatenate(arrays).tobytes())
                fends.write(np.asarray(ends, np.int64).tobytes())
                for f in (ftok, fends):
                    f.flush()
                    os.fsync(f.fileno())
                nbytes = sum(len(t.encode("utf-8", errors="replace")) for t, _ in batch)
                state = {"pieces": state["pieces"] + len(batch), "tokens": n,
                         "documents": state["documents"] + len(ends), "bytes": state["bytes"] + nbytes}  # fmt: skip
                done[split] = state
                _write_json(progress_file, done)
                bar.update(nbytes)
                batch, size = [], 0
    bar.close()
    done[split] = {**state, "complete": True}
    _write_json(progress_file, done)
    return {k: state[k] for k in ("tokens", "documents", "bytes")}


def _encode(tokenizer: Tokenizer, texts: list[str], dtype) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8", errors="surrogateescape"), np.uint8).astype(dtype) for t in texts]
    return [np.asarray(ids, dtype) for ids in tokenizer.encode_batch(texts)]


def _then_none(it):
    yield from it
    yield None


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def cache_root(cache_dir: str = "") -> Path:
    if cache_dir or os.environ.get("JAXLM_DATA_CACHE"):
        return Path(cache_dir or os.environ["JAXLM_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("JAXLM_CACHE", Path.home() / ".cache" / "jaxlm")).expanduser() / "data"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path):
    """One process prepares a cache entry; others on the machine wait for it, then find it done."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_tokenizer(
    texts: list[tuple[TextSource, float]], kind: str, vocab_size: int, *, mask=False, sample_mb=256, cache_dir=""
) -> Tokenizer:
    """`train_tokenizer`, cached by the corpora's fingerprints, weights and the settings (a BPE trains once per
    corpus)."""
    if kind == "byte":
        return ByteTokenizer(mask)
    total = sum(w for _, w in texts)
    key = _key("tokenizer", [(t.fingerprint(), t.val_fraction, t.text_field, w / total) for t, w in texts],
               kind, vocab_size, mask, sample_mb)  # fmt: skip
    path = cache_root(cache_dir) / f"tokenizer-{key}" / "tokenizer.json"
    with _locked(path.parent.with_suffix(".lock")):
        if path.is_file():
            return load_tokenizer(path)
        tokenizer = train_tokenizer(texts, kind, vocab_size, mask=mask, sample_mb=sample_mb)
        tmp = path.parent.with_name(path.parent.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tmp / "tokenizer.json")
        if path.parent.exists():
            shutil.rmtree(path.parent)
        os.replace(tmp, path.parent)
    return tokenizer


def ensure_prepared(text: TextSource, tokenizer: Tokenizer, *, cache_dir: str = "", progress: bool = False) -> Prepared:
    """The cached prepared copy of `text` under `tokenizer`, preparing it the first time."""
    key = _key(FORMAT, text.fingerprint(), text.val_fraction, text.text_field, tokenizer_sha(tokenizer))
    out = cache_root(cache_dir) / f"tokens-{key}"
    with _locked(out.with_suffix(".lock")):
        if is_prepared(out):
            log.info("prepared data: %s (cached)", out)
            return open_prepared(out)
        log.info("preparing %s into %s (once; later runs read it)", text.source, out)
        return prepare(text, out, tokenizer, progress=progress)
