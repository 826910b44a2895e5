"""Text corpora: the embedded Shakespeare corpus, or the user's files.

The embedded corpus is the complete works (Project Gutenberg transcriptions,
public domain), one work per member of `shakespeare.tar.xz` in this package.
Validation is whole works, so it measures generalisation to unseen plays.
"""

from __future__ import annotations

import glob
import logging
import tarfile
from importlib import resources
from pathlib import Path

from jaxlm.data.tokenizer import DataError

log = logging.getLogger(__name__)

EMBEDDED = "shakespeare"
# About 5% of the corpus: two plays that the model never trains on.
VAL_WORKS = ("julius_caesar.txt", "twelfth_night.txt")


def embedded_works() -> dict[str, str]:
    """{file name: text} of the embedded corpus."""
    with resources.files("jaxlm.data").joinpath("shakespeare.tar.xz").open("rb") as f:
        with tarfile.open(fileobj=f, mode="r:xz") as tf:
            return {
                m.name: tf.extractfile(m).read().decode("utf-8") for m in sorted(tf.getmembers(), key=lambda m: m.name)
            }


def read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d); invalid bytes become U+FFFD", path, e.start)
        return data.decode("utf-8", errors="replace")


def _resolve_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data directory {path} holds no files")
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise DataError(
            f"data source {source!r} is neither the embedded corpus {EMBEDDED!r}, a file, a directory nor a glob that matches files"
        )
    return matches


def load_corpus(source: str, val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Returns (train documents, validation documents).

    Several files: whole files from the end of the sorted list are held out
    until they reach `val_fraction` of the bytes. One file: its last
    `val_fraction`, cut at a line break.
    """
    if source == EMBEDDED:
        works = embedded_works()
        return [t for n, t in works.items() if n not in VAL_WORKS], [works[n] for n in VAL_WORKS]

    files = _resolve_files(source)
    texts = [read_text_file(p) for p in files]
    total = sum(len(t) for t in texts)
    if total == 0:
        raise DataError(f"data source {source!r} is empty")
    if len(texts) > 1:
        val, held = [], 0
        while texts and held < val_fraction * total and len(texts) > 1:
            t = texts.pop()
            val.insert(0, t)
            held += len(t)
        return texts, val
    text = texts[0]
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > len(text) // 2 else cut
    return [text[:cut]], [text[cut:]]
