"""Instruction data: JSONL examples -> token ids with loss masks -> packed rows with segment ids.

An example is `{"messages": [{"role", "content"}, ...]}` (rendered with a chat template, `jaxlm.data.chat`;
the loss covers each assistant turn as the template writes it, end-of-turn marker included) or
`{"prompt", "completion"}` (prompt + completion + end-of-text; the loss covers the completion and the
end-of-text). Tokens before the first scored one form the prompt (a prefix LM attends to it bidirectionally).

Packing puts several examples in a row of seq_len positions, first fit in a seeded order; each example has
its own segment id (attention never crosses examples) and positions restarting at 0. Policy for an example
longer than seq_len + 1 tokens (`data.too_long`): truncate keeps its first seq_len + 1 tokens, drop leaves it
out; either way an example left with no scored token is dropped, and the counts are logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaxlm.data.chat import render
from jaxlm.data.jsonl import read_records
from jaxlm.data.loader import Batches
from jaxlm.errors import DataError

log = logging.getLogger(__name__)

FIELDS = ("inputs", "targets", "mask", "positions", "segments", "valid", "prefix")
OPEN_ROWS = 64  # packing looks for room in the most recent rows only: linear time, rows >95% full


def read_jsonl(path: str | Path) -> list[dict]:
    """Checked examples of a JSONL file; DataError naming the file and line of the first bad one."""
    return read_records(path, check_example, "instruction", "examples")


def check_example(ex, where: str) -> dict:
    """The example if it is a chat or a prompt/completion pair, else DataError naming `where` and the problem."""
    if not isinstance(ex, dict):
        raise DataError(f"{where}: an example is a JSON object, got {type(ex).__name__}")
    if "messages" in ex:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: messages must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string role and a string content, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message: nothing to learn")
        return ex
    if isinstance(ex.get("prompt"), str) and isinstance(ex.get("completion"), str):
        return ex
    raise DataError(
        f'{where}: expected {{"messages": [...]}} or {{"prompt": str, "completion": str}}, got keys {sorted(ex)}'
    )


def encode_example(ex: dict, tokenizer, template: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int32, scored (n,) bool): which tokens the loss covers (as targets)."""
    if "messages" not in ex:
        prompt, completion = tokenizer.encode(ex["prompt"]), tokenizer.encode(ex["completion"])
        ids = prompt + completion + [tokenizer.eos_id]
        scored = [False] * len(prompt) + [True] * (len(completion) + 1)
        return np.asarray(ids, np.int32), np.asarray(scored, bool)
    msgs, special = ex["messages"], getattr(tokenizer, "special_tokens", {})
    text = render(template, msgs, **special)
    spans = []  # character spans of the assistant turns
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = render(template, msgs[:i], add_generation_prompt=True, **special) if i else ""
        end = render(template, msgs[: i + 1], **special)
        if not (text.startswith(start) and text.startswith(end)):
            raise DataError("the chat template does not render a conversation's turns as prefixes of the whole")
        spans.append((len(start), len(end)))
    ids, offsets = tokenizer.encode_offsets(text)
    starts = np.asarray([o[0] for o in offsets] or [0])[: len(ids)]
    scored = np.zeros(len(ids), bool)
    for a, b in spans:
        scored |= (starts >= a) & (starts < b)
    return np.asarray(ids, np.int32), scored


def pack(
    examples: list[tuple[np.ndarray, np.ndarray]], *, seq_len: int, pack: bool, too_long: str, seed: int
) -> dict[str, np.ndarray]:
    """Rows of FIELDS (R, seq_len) from encoded examples; see the module docstring for the policy."""
    kept, truncated, dropped = [], 0, 0
    for ids, scored in examples:
        if len(ids) > seq_len + 1:
            if too_long == "drop":
                dropped += 1
                continue
            ids, scored, truncated = ids[: seq_len + 1], scored[: seq_len + 1], truncated + 1
        if len(ids) < 2 or not scored[1:].any():
            dropped += 1
            continue
        kept.append((ids, scored))
    if truncated or dropped:
        log.info(
            "instruction data: %d examples truncated, %d dropped (over seq_len or nothing to score)", truncated, dropped
        )
    if not kept:
        raise DataError(f"no instruction example fits data.seq_len={seq_len} with a token to score")
    order = np.random.default_rng(seed).permutation(len(kept)) if pack else np.arange(len(kept))
    rows, fill = [], []  # rows: lists of example indices; fill: positions used
    for i in order:
        n = len(kept[i][0]) - 1
        for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)) if pack else ():  # first fit among recent rows
            if fill[r] + n <= seq_len:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    out = {k: np.zeros((len(rows), seq_len), bool if k in ("mask", "valid", "prefix") else np.int32) for k in FIELDS}
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            ids, scored = kept[i]
            n = len(ids) - 1
            cols = slice(at, at + n)
            out["inputs"][r, cols], out["targets"][r, cols] = ids[:-1], ids[1:]
            out["mask"][r, cols] = scored[1:]
            out["positions"][r, cols] = np.arange(n)
            out["segments"][r, cols] = s
            out["valid"][r, cols] = True
            first = int(np.argmax(scored))  # the prompt: tokens before the first scored one
            out["prefix"][r, at : at + min(first, n)] = True
            at += n
    return out


class RowLoader(Batches):
    """Batches of whole rows, a seeded permutation per epoch: batch k is a pure function of (seed, k).

    Its state is the number of batches served (as `PackedLoader`). rows = (lo, hi): the rows of every global
    batch that this process holds.
    """

    def __init__(self, data: dict[str, np.ndarray], *, batch_size: int, seed: int = 0, rows=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.n = len(next(iter(data.values())))
        if self.n < batch_size:
            raise DataError(f"instruction data makes {self.n} rows: too few for a batch of {batch_size}")
        self.batches_per_epoch = self.n // batch_size
        self.rows = rows or (0, batch_size)
        self.position = 0
        self._epoch, self._order = -1, None

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_rows": self.n}

    def restore(self, state: dict) -> None:
        if state.get("num_rows") != self.n or state.get("seed") != self.seed:
            raise DataError(
                f"checkpointed data position was saved for {state.get('num_rows')} rows with seed {state.get('seed')}, "
                f"but the data now has {self.n} rows with seed {self.seed}: the data changed since the checkpoint"
            )
        self.position = int(state["position"])

    def batch(self, k: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
        idx = self._order[i * self.batch_size : (i + 1) * self.batch_size][self.rows[0] : self.rows[1]]
        return {k: v[idx] for k, v in self.data.items()}


def row_batches(data: dict[str, np.ndarray], batch_size: int, max_batches: int = 0):
    """Every row once, in order; the last batch padded with rows that score nothing."""
    n = len(next(iter(data.values())))
    for b, lo in enumerate(range(0, n, batch_size)):
        if max_batches and b >= max_batches:
            return
        out = {}
        for k, v in data.items():
            part = v[lo : lo + batch_size]
            pad = np.zeros((batch_size - len(part), *v.shape[1:]), v.dtype)
            out[k] = np.concatenate([part, pad])
        yield out
