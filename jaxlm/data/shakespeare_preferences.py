"""The embedded preference set: the embedded instruction questions, each with its true answer (chosen) and a
wrong answer taken from another play (rejected).

Built deterministically from the embedded corpus (`jaxlm.data.shakespeare_instructions`, same seed -> the same
pairs). For `speaker` and `first` questions the rejected answer is a character of another play whose name does
not occur in the passage; for `next_line` it is a line of a speech of another play. Wrong answers come from
the other plays of the same split (training plays for training pairs, the other held-out play for held-out
pairs), so a held-out pair can only be judged by reading its passage: the chosen answer is in it, the
rejected one is not. Pairs are {"prompt", "chosen", "rejected", "task"}.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxlm.data.corpus import VAL_WORKS, embedded_works
from jaxlm.data.shakespeare_instructions import play_examples, speeches

NAME = "shakespeare_preferences"


def _pairs(plays: list[tuple[str, tuple[dict, ...]]], seed: int) -> list[dict]:
    works = embedded_works()
    names = {w: sorted({who for who, _ in speeches(works[w])}) for w, _ in plays}
    lines = {w: [ln for _, body in speeches(works[w]) for ln in body[:2] if len(ln) > 8] for w, _ in plays}
    out = []
    for k, (work, examples) in enumerate(plays):
        others = [w for w, _ in plays if w != work]
        rng = np.random.default_rng([seed, k])
        for e in examples:
            other = others[int(rng.integers(len(others)))]
            if e["task"] == "next_line":
                pool = lines[other]
            else:
                pool = [n for n in names[other] if n not in e["prompt"] and f" {n}" != e["completion"]]
            wrong = pool[int(rng.integers(len(pool)))]
            out.append({"prompt": e["prompt"], "chosen": e["completion"], "rejected": f" {wrong}", "task": e["task"]})
    return out


@functools.cache
def _splits(per_play: int, seed: int) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    plays = [(w, ex) for w, ex in play_examples(per_play, seed) if ex]
    train = _pairs([p for p in plays if p[0] not in VAL_WORKS], seed)
    val = _pairs([p for p in plays if p[0] in VAL_WORKS], seed)
    return tuple(train), tuple(val)


def preference_splits(per_play: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs), from the training plays and from the held-out plays."""
    train, val = _splits(per_play, seed)
    return [dict(p) for p in train], [dict(p) for p in val]
