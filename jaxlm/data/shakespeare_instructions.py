"""The embedded instruction set: questions about passages of the embedded plays, with exact answers.

Built deterministically from the embedded corpus (same plays, same order, same seed -> the same set).
Every answer is in its prompt, so held-out plays can be answered too:

  speaker     a passage of 2-4 speeches, then: Who says "<one of its lines>"?  -> the speaker's name
  first       a passage, then: Who speaks first?                              -> the first speaker's name
  next_line   one speech, then: Which line follows "<a line>"?                -> the next line of the speech

Examples are {"prompt", "completion", "task"}; the completion starts with a space and holds the answer alone
(the end-of-text token is added when tokenizing). Training examples come from the training plays, validation
examples from the held-out plays of the corpus (`VAL_WORKS`), so exact match measures unseen text.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from jaxlm.data.corpus import VAL_WORKS, embedded_works

NAME = "shakespeare_instructions"
TASKS = ("speaker", "first", "next_line")
_SPEAKER = re.compile(r"^([A-Z][A-Z' .-]*[A-Z])\.$")
MAX_PASSAGE = 220  # characters: prompt and answer stay within 128 BPE tokens of the default tokenizer


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech of a play: a block of lines headed by `NAME.`."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) >= 2 and (m := _SPEAKER.match(lines[0])):
            body = [ln for ln in lines[1:] if not ln.startswith("[")]
            if body:
                out.append((m.group(1), body))
    return out


def _passage(group) -> str:
    return "\n\n".join(f"{who}.\n" + "\n".join(lines) for who, lines in group)


def _examples(text: str, rng: np.random.Generator, per_task: int) -> list[dict]:
    sp = [(who, lines[:2]) for who, lines in speeches(text)]
    out = {t: [] for t in TASKS}
    for start in rng.permutation(max(len(sp) - 4, 0)):
        group = sp[start : start + int(rng.integers(2, 5))]
        passage = _passage(group)
        if len(passage) > MAX_PASSAGE or len({w for w, _ in group}) < 2:
            continue
        lines = [(who, ln) for who, ls in group for ln in ls]
        counts = {}
        for _, ln in lines:
            counts[ln] = counts.get(ln, 0) + 1
        unique = [(who, ln) for who, ln in lines if counts[ln] == 1 and len(ln) > 12]
        if len(out["speaker"]) < per_task and unique:
            who, ln = unique[int(rng.integers(len(unique)))]
            out["speaker"].append(_example(passage, f'Who says "{ln}"?', who, "speaker"))
        elif len(out["first"]) < per_task:
            out["first"].append(_example(passage, "Who speaks first?", group[0][0], "first"))
        if len(out["next_line"]) < per_task:
            who, body = group[0]
            if len(body) == 2 and len(body[1]) > 8:
                speech = _passage(group[:1])
                out["next_line"].append(_example(speech, f'Which line follows "{body[0]}"?', body[1], "next_line"))
        if all(len(v) >= per_task for v in out.values()):
            break
    return [e for t in TASKS for e in out[t]]


def _example(passage: str, question: str, answer: str, task: str) -> dict:
    return {"prompt": f"{passage}\n\nQuestion: {question}\nAnswer:", "completion": f" {answer}", "task": task}


@functools.cache
def play_examples(per_play: int = 60, seed: int = 0) -> tuple[tuple[str, tuple[dict, ...]], ...]:
    """(work name, its examples) for every embedded work: `per_play` per task from each play with speeches."""
    return tuple(
        (name, tuple(_examples(text, np.random.default_rng([seed, i]), per_play)))
        for i, (name, text) in enumerate(embedded_works().items())
    )


def instruction_splits(per_play: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples): those of the training plays and of the held-out plays."""
    train, val = [], []
    for name, examples in play_examples(per_play, seed):
        (val if name in VAL_WORKS else train).extend(dict(e) for e in examples)
    return train, val


VERSE = "shakespeare_verse"


@functools.cache
def _verse(per_play: int, seed: int) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    train, val = [], []
    for i, (name, text) in enumerate(embedded_works().items()):
        rng = np.random.default_rng([seed, i, 1])
        sp = [(who, body) for who, body in speeches(text) if len(body) >= 2 and len(body[0]) > 20]
        picked = [sp[j] for j in sorted(rng.permutation(len(sp))[:per_play])]
        out = val if name in VAL_WORKS else train
        out += [{"prompt": f"{who}.\n{body[0]}\n", "completion": body[1], "task": "verse"} for who, body in picked]
    return tuple(train), tuple(val)


def verse_splits(per_play: int = 40, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Prompts to continue a speech: a speaker's heading and the speech's first line; the reference completion
    is its second line. (training prompts, held-out prompts), from the training and the held-out plays."""
    train, val = _verse(per_play, seed)
    return [dict(e) for e in train], [dict(e) for e in val]
