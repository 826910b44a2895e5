"""Text corpora: the embedded Shakespeare corpus, or the user's files.

The embedded corpus is the complete works (Project Gutenberg transcriptions,
public domain), one work per member of `shakespeare.tar.xz` in this package.
Validation is whole works, so it measures generalisation to unseen plays.
"""

from __future__ import annotations

import functools
import tarfile
from importlib import resources

from jaxlm.data.sources import BadRecords, Part, pieces, source_files, split_parts

EMBEDDED = "shakespeare"
# About 5% of the corpus: two plays that the model never trains on.
VAL_WORKS = ("julius_caesar.txt", "twelfth_night.txt")


@functools.cache
def embedded_works() -> dict[str, str]:
    """{file name: text} of the embedded corpus (read once a process; 5 MB)."""
    with resources.files("jaxlm.data").joinpath("shakespeare.tar.xz").open("rb") as f:
        with tarfile.open(fileobj=f, mode="r:xz") as tf:
            return {
                m.name: tf.extractfile(m).read().decode("utf-8") for m in sorted(tf.getmembers(), key=lambda m: m.name)
            }


def load_corpus(
    source: str, val_fraction: float = 0.05, text_field: str = "text", max_bad_records: int = 0
) -> tuple[list[str], list[str]]:
    """Returns (train documents, validation documents), in memory (small corpora; training streams them through
    `jaxlm.data.prepare`). The split is `jaxlm.data.sources.split_parts`'s: whole files from the end of the
    sorted list until they reach `val_fraction` of the bytes, or the end of the one file."""
    if source == EMBEDDED:
        works = embedded_works()
        return [t for n, t in works.items() if n not in VAL_WORKS], [works[n] for n in VAL_WORKS]
    train, val = split_parts(source_files(source), val_fraction, text_field)
    bad = BadRecords(max_bad_records)
    return documents(train, text_field, bad), documents(val, text_field, bad)


def documents(parts: list[Part], text_field: str = "text", bad: BadRecords | None = None) -> list[str]:
    """Every document of `parts`, whole."""
    docs, current = [], []
    for part in parts:
        for text, ends in pieces(part, text_field, bad):
            current.append(text)
            if ends:
                docs.append("".join(current))
                current = []
    return docs
