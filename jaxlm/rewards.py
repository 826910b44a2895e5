"""Reward functions for ppo/grpo (`align.reward: jaxlm.rewards:NAME`), TRL's signature:
`f(prompts, completions, **fields) -> list[float]`, one reward per completion; `fields` are the prompt records'
other data fields, one value per completion.

These check answers to the embedded instruction set (`jaxlm.data.shakespeare_instructions`), whose prompts are
a passage of speeches ("NAME." heading each), a question, and "Answer:"; the reference is the `completion`
field. They read the answer's first line, whitespace-normalized.
"""

from __future__ import annotations

import re

_HEADING = re.compile(r"^([A-Z][A-Z' .-]*[A-Z])\.$")


def _answer(text: str) -> str:
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def _passage(prompt: str) -> tuple[set[str], set[str]]:
    """(speaker names, spoken lines) of an instruction prompt's passage."""
    body = prompt.split("\n\nQuestion:")[0]
    names, lines = set(), set()
    for ln in body.splitlines():
        ln = " ".join(ln.split())
        if m := _HEADING.match(ln):
            names.add(m.group(1))
        elif ln:
            lines.add(ln)
    return names, lines


def exact_answer(prompts, completions, completion=None, **_) -> list[float]:
    """1 when the answer is the reference answer, else 0."""
    if completion is None:
        raise ValueError("exact_answer needs the prompts' reference `completion` field")
    return [float(_answer(c) == _answer(ref)) for c, ref in zip(completions, completion)]


def passage_answer(prompts, completions, completion=None, task=None, **_) -> list[float]:
    """How well the answer is grounded in the passage, from 0 to 3: the share of its words found among the
    passage's candidate answers (its speakers' names for who-questions, the words of its lines for which-line
    questions), +1 when it is one of those candidates exactly (a speaker, a line), +1 more when it is the
    reference answer. Graded, so that a group of samples differs in reward, and checkable by reading."""
    if completion is None or task is None:
        raise ValueError("passage_answer needs the prompts' `completion` and `task` fields")
    out = []
    for prompt, c, ref, t in zip(prompts, completions, completion, task):
        names, lines = _passage(prompt)
        candidates = lines if t == "next_line" else names
        vocabulary = {w for cand in candidates for w in cand.split()}
        a = _answer(c)
        words = a.split()
        share = sum(w in vocabulary for w in words) / len(words) if words else 0.0
        exact = a in candidates
        out.append(share + float(exact) + float(exact and a == _answer(ref)))
    return out


_VOWELS = re.compile(r"[aeiouy]+")


def syllables(word: str) -> int:
    """An English syllable count by vowel groups, a final silent e left out (at least 1 per word)."""
    w = re.sub(r"[^a-z]", "", word.lower())
    if not w:
        return 0
    n = len(_VOWELS.findall(w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(n, 1)


def verse_line(prompts, completions, **_) -> list[float]:
    """Verse form: the completion's first line, scored 1 at ten syllables (a pentameter's), falling linearly to 0
    at five fewer or more, halved unless it starts with a capital letter (verse lines do in the corpus)."""
    out = []
    for c in completions:
        line = c.strip("\n").split("\n")[0].strip()
        n = sum(syllables(w) for w in line.split())
        score = max(0.0, 1.0 - abs(n - 10) / 5)
        out.append(score * (1.0 if line[:1].isupper() else 0.5))
    return out
