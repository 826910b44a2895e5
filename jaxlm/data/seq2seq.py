"""Sequence-to-sequence batches: T5 span corruption of a token stream, and source/target text pairs.

Span corruption (Raffel et al. 2020, `random_spans_noise_mask` in the T5
code): `rate` of each window's tokens, in spans of mean length `mean_span`,
are replaced in the source by one sentinel per span; the target lists each
sentinel followed by the tokens it replaced, then end-of-text. Sentinels are
the top ids of the model vocabulary (vocab_size - 1, - 2, ...), above the
tokenizer's. Pairs: a UTF-8 text file with one `source<TAB>target` per line.

Batches are {"src", "src_mask", "tgt_in", "tgt_out", "tgt_mask"}: (B, S) and
(B, T) arrays; tgt_in is `start_id` followed by tgt_out shifted right. As in
`PackedLoader`, batch k is a pure function of (seed, k), so the loader's
state is one number.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxlm.data.loader import Batches
from jaxlm.data.tokenizer import DataError


def random_spans_mask(rng: np.random.Generator, length: int, rate: float, mean_span: float) -> np.ndarray:
    """(length,) bool, True on the corrupted tokens: round(length * rate) of them in
    round(noise / mean_span) spans, alternating with kept spans, starting with a kept one."""
    noise = min(max(int(round(length * rate)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)

    def segment(n, k):  # n items cut into k non-empty pieces, uniformly at random
        cuts = np.sort(rng.choice(np.arange(1, n), k - 1, replace=False)) if k > 1 else np.array([], int)
        return np.diff(np.concatenate([[0], cuts, [n]]))

    noise_lengths, kept_lengths = segment(noise, spans), segment(length - noise, spans)
    mask = np.zeros(length, bool)
    pos = 0
    for kept, noisy in zip(kept_lengths, noise_lengths):
        pos += kept
        mask[pos : pos + noisy] = True
        pos += noisy
    return mask


def span_corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: list[int], eos_id: int):
    """(source, target) token lists for one window and its noise mask."""
    src, tgt, span, prev = [], [], -1, False
    for tok, noisy in zip(tokens.tolist(), mask.tolist()):
        if noisy:
            if not prev:  # a new span: one sentinel in the source, and before its tokens in the target
                span += 1
                src.append(sentinels[span])
                tgt.append(sentinels[span])
            tgt.append(tok)
        else:
            src.append(tok)
        prev = noisy
    return src, tgt + [eos_id]


def span_target_len(seq_len: int, rate: float, mean_span: float) -> int:
    """The longest target span corruption makes from a seq_len window (noise + sentinels + end)."""
    noise = min(max(int(round(seq_len * rate)), 1), seq_len - 1)
    return noise + max(int(round(noise / mean_span)), 1) + 1


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """`source<TAB>target` lines of a UTF-8 file (invalid bytes become U+FFFD); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    text = path.read_bytes().decode("utf-8", errors="replace")
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{n}: expected 'source<TAB>target', got {line[:60]!r}")
        src, tgt = line.split("\t", 1)
        pairs.append((src, tgt))
    if len(pairs) < 2:
        raise DataError(f"{path} holds {len(pairs)} pairs; need at least 2 (training and validation)")
    return pairs


def _batch(examples, seq_len: int, target_len: int, start_id: int) -> dict[str, np.ndarray]:
    B = len(examples)
    out = {
        "src": np.zeros((B, seq_len), np.int32),
        "src_mask": np.zeros((B, seq_len), bool),
        "tgt_in": np.zeros((B, target_len), np.int32),
        "tgt_out": np.zeros((B, target_len), np.int32),
        "tgt_mask": np.zeros((B, target_len), bool),
    }
    for i, (src, tgt) in enumerate(examples):
        src, tgt = src[:seq_len], tgt[:target_len]
        out["src"][i, : len(src)], out["src_mask"][i, : len(src)] = src, True
        out["tgt_out"][i, : len(tgt)], out["tgt_mask"][i, : len(tgt)] = tgt, True
        out["tgt_in"][i, 0] = start_id
        out["tgt_in"][i, 1 : len(tgt)] = tgt[:-1]
    return out


class Seq2SeqLoader(Batches):
    """Training batches of span-corrupted windows (`tokens`) or of tokenized pairs (`pairs`)."""

    def __init__(
        self,
        *,
        tokens: np.ndarray | None = None,
        pairs: list[tuple[list[int], list[int]]] | None = None,
        seq_len: int,
        target_len: int,
        batch_size: int,
        start_id: int,
        eos_id: int,
        sentinels: list[int] = (),
        rate: float = 0.15,
        mean_span: float = 3.0,
        seed: int = 0,
        rows: tuple[int, int] | None = None,
        training: bool = True,
    ):
        """training=False: for `eval_batches` only (fewer examples than a batch are fine)."""
        self.tokens, self.pairs = tokens, pairs
        self.seq_len, self.target_len, self.batch_size = seq_len, target_len, batch_size
        self.start_id, self.eos_id, self.sentinels = start_id, eos_id, list(sentinels)
        self.rate, self.mean_span, self.seed = rate, mean_span, seed
        self.rows = rows or (0, batch_size)
        self.examples = len(pairs) if pairs is not None else len(tokens) // seq_len
        if self.examples < 1:
            raise DataError(f"no {seq_len}-token window or pair to build examples from")
        if tokens is not None:
            need = max(int(round(min(max(round(seq_len * rate), 1), seq_len - 1) / mean_span)), 1)
            if len(self.sentinels) < need:
                raise DataError(
                    f"span corruption of {seq_len}-token windows needs {need} sentinel ids above the tokenizer's "
                    f"vocabulary, but only {len(self.sentinels)} fit under model.vocab_size"
                )
        self.batches_per_epoch = self.examples // batch_size
        if training and self.batches_per_epoch < 1:
            raise DataError(f"{self.examples} training examples are too few for one batch of {batch_size}")
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "examples": self.examples}

    def restore(self, state: dict) -> None:
        if state.get("examples") != self.examples or state.get("seed") != self.seed:
            raise DataError("checkpointed data position does not match the data: corpus, tokenizer or seed changed")
        self.position = int(state["position"])

    def example(self, i: int, rng: np.random.Generator):
        if self.pairs is not None:
            return self.pairs[i]
        window = np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len], np.int32)
        mask = random_spans_mask(rng, len(window), self.rate, self.mean_span)
        return span_corrupt(window, mask, self.sentinels, self.eos_id)

    def batch(self, k: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(k, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        ids = order[i * self.batch_size : (i + 1) * self.batch_size][self.rows[0] : self.rows[1]]
        examples = [self.example(int(j), np.random.default_rng([self.seed, epoch, int(j)])) for j in ids]
        return _batch(examples, self.seq_len, self.target_len, self.start_id)

    def eval_batches(self, max_batches: int = 0):
        """Every example once, in order (the last batch padded with empty rows), fixed corruption."""
        n = math.ceil(self.examples / self.batch_size)
        for b in range(min(n, max_batches) if max_batches else n):
            ids = range(b * self.batch_size, min((b + 1) * self.batch_size, self.examples))
            examples = [self.example(j, np.random.default_rng([self.seed, 2**31 - 1, j])) for j in ids]
            examples += [([], [])] * (self.batch_size - len(examples))
            yield _batch(examples, self.seq_len, self.target_len, self.start_id)
