"""Preference pairs: JSONL `{"prompt", "chosen", "rejected"}` -> token ids -> rows of (chosen, rejected).

A pair is plain text (`prompt`, `chosen`, `rejected` strings; the completions follow the prompt directly) or
conversational as TRL writes it (`prompt` a list of messages, `chosen`/`rejected` lists of assistant
messages, rendered with the chat template of `jaxlm.data.chat`; a completion is what the template writes after
the prompt's generation prompt, end-of-turn marker included).

Rows are (N, 2, T) arrays, index 0 the chosen and 1 the rejected sequence, right-padded:
  tokens  prompt + completion (+ end-of-text for a policy: DPO learns where to stop; not for a reward model,
          which scores the last token, so a sequence ends with its completion's last token)
  valid   real tokens
  mask    completion tokens (what DPO's log-probs sum over)
A pair longer than T tokens (`data.too_long`): truncate keeps the end of the prompt (the part nearest the
answer, at least half the row when the completion is long) and the start of the completions; drop leaves it
out. A pair whose chosen and rejected completions are identical carries no preference: it is left out with a
warning that counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaxlm.data.chat import render
from jaxlm.data.jsonl import read_records
from jaxlm.errors import DataError

log = logging.getLogger(__name__)

FIELDS = ("tokens", "valid", "mask")


def read_preferences(path: str | Path) -> list[dict]:
    """Checked pairs of a JSONL file; DataError naming the file and line of the first bad one."""
    return read_records(path, check_pair, "preference", "pairs")


def _messages(value, where: str, key: str) -> None:
    if not value:
        raise DataError(f"{where}: {key} is an empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] needs a string role and a string content, got {m!r}")


def check_pair(ex, where: str) -> dict:
    """The pair if it is well formed, else DataError naming `where` and the problem."""
    if not isinstance(ex, dict):
        raise DataError(f"{where}: a preference pair is a JSON object, got {type(ex).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in ex]
    if missing:
        raise DataError(f'{where}: a preference pair needs "prompt", "chosen" and "rejected"; missing {missing}')
    prompt = ex["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        for key in ("chosen", "rejected"):
            if not isinstance(ex[key], str):
                raise DataError(f"{where}: a text prompt takes text completions; {key} is {type(ex[key]).__name__}")
            if not ex[key]:
                raise DataError(f"{where}: {key} is empty")
        return ex
    if isinstance(prompt, list):
        _messages(prompt, where, "prompt")
        for key in ("chosen", "rejected"):
            if not isinstance(ex[key], list):
                raise DataError(f"{where}: a chat prompt takes message-list completions; {key} is not a list")
            _messages(ex[key], where, key)
            if any(m["role"] != "assistant" for m in ex[key]):
                raise DataError(f"{where}: {key} holds the assistant's reply: its messages' role must be assistant")
        return ex
    raise DataError(f"{where}: prompt must be text or a list of messages, got {type(prompt).__name__}")


def encode_pair(ex: dict, tokenizer, template: str | None, *, eos: bool) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids); eos: end the completions of a text pair with end-of-text."""
    if isinstance(ex["prompt"], str):
        end = [tokenizer.eos_id] if eos else []
        return (
            tokenizer.encode(ex["prompt"]),
            tokenizer.encode(ex["chosen"]) + end,
            tokenizer.encode(ex["rejected"]) + end,
        )
    if template is None:
        raise DataError("a conversational preference pair needs a chat template")
    special = getattr(tokenizer, "special_tokens", {})
    prompt = render(template, ex["prompt"], add_generation_prompt=True, **special)
    completions = []
    for key in ("chosen", "rejected"):
        full = render(template, ex["prompt"] + ex[key], **special)
        if not full.startswith(prompt):
            raise DataError("the chat template does not render the prompt as a prefix of the conversation")
        completions.append(tokenizer.encode(full[len(prompt) :]))
    return tokenizer.encode(prompt), completions[0], completions[1]


def pair_rows(encoded: list[tuple], *, seq_len: int, too_long: str = "truncate") -> dict[str, np.ndarray]:
    """Rows of FIELDS, (N, 2, seq_len), from `encode_pair` outputs; see the module docstring for the policy."""
    kept, truncated, dropped, same = [], 0, 0, 0
    for p, c, r in encoded:
        if list(c) == list(r):
            same += 1
            continue
        longest = max(len(c), len(r))
        if len(p) + longest > seq_len:
            if too_long == "drop":
                dropped += 1
                continue
            keep = min(len(p), max(seq_len - longest, seq_len // 2))
            p, c, r = p[len(p) - keep :], c[: seq_len - keep], r[: seq_len - keep]
            truncated += 1
        kept.append((p, c, r))
    if same:
        log.warning("preference data: %d pairs have identical chosen and rejected completions; left out", same)
    if truncated or dropped:
        log.info("preference data: %d pairs truncated, %d dropped (over data.seq_len)", truncated, dropped)
    if not kept:
        raise DataError(f"no preference pair fits data.seq_len={seq_len} with differing completions")
    N = len(kept)
    out = {k: np.zeros((N, 2, seq_len), np.int32 if k == "tokens" else bool) for k in FIELDS}
    for i, (p, c, r) in enumerate(kept):
        for j, comp in enumerate((c, r)):
            n = len(p) + len(comp)
            out["tokens"][i, j, :n] = list(p) + list(comp)
            out["valid"][i, j, :n] = True
            out["mask"][i, j, len(p) : n] = True
    return out
