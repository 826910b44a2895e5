"""Packed, deterministic batches of token sequences.

Documents are joined with end-of-text tokens into one stream. Each epoch picks
a random offset and a random order of the `seq_len + 1`-token windows that
follow it (seeded by `seed` and the epoch), so batch k is a pure function of
(seed, k): the loader's whole state is the number of batches it has served,
which is saved in every checkpoint. Multi-host: each process reads only the
rows of every global batch that its devices hold.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data.tokenizer import DataError


def pack_documents(docs: list[list[int]], eos_id: int) -> np.ndarray:
    """Token ids of every document, each followed by `eos_id`, as one int32 array."""
    if not docs:
        return np.zeros((0,), np.int32)
    parts = []
    for d in docs:
        parts.append(np.asarray(d, np.int32))
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts)


class PackedLoader:
    """Batches of {"inputs", "targets"}: (batch, seq_len) int32, targets shifted by one."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        rows: tuple[int, int] | None = None,
    ):
        """`rows` = (lo, hi): serve only those rows of every global batch (what this process's
        devices hold); default: an equal share by `process_index` of `process_count`."""
        if batch_size % process_count:
            raise DataError(f"batch size {batch_size} does not split over {process_count} processes")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        per = batch_size // process_count
        self.rows = rows or (process_index * per, (process_index + 1) * per)
        # One window fewer than fits, so every epoch's random offset still fits them all.
        self.windows = (len(tokens) - 1) // seq_len - 1
        self.batches_per_epoch = self.windows // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"training split has {len(tokens)} tokens: too few for one batch of "
                f"{batch_size} x {seq_len + 1} tokens; use more data or a smaller batch/seq_len"
            )
        self.position = 0  # batches served
        self._epoch, self._order, self._offset = -1, None, 0

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_tokens": int(len(self.tokens))}

    def restore(self, state: dict) -> None:
        if state.get("num_tokens") != len(self.tokens) or state.get("seed") != self.seed:
            raise DataError(
                f"checkpointed data position was saved for {state.get('num_tokens')} tokens with seed "
                f"{state.get('seed')}, but the data now has {len(self.tokens)} tokens with seed {self.seed}: "
                "the corpus, tokenizer or data.seed changed since the checkpoint"
            )
        self.position = int(state["position"])

    def batch(self, k: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.windows)
            self._epoch = epoch
        rows = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        rows = rows[self.rows[0] : self.rows[1]]
        starts = self._offset + rows * self.seq_len
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        seqs = self.tokens[idx]
        return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self.position)
        self.position += 1
        return b


def document_segments(inputs: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Segment ids and positions of the documents packed in rows of inputs (B, T) (`data.document_mask`).

    A document's end-of-text token is its last; the next token starts a new segment at position 0.
    """
    ends = np.cumsum(inputs == eos_id, axis=1)
    segments = np.concatenate([np.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1).astype(np.int32)
    starts = np.zeros_like(segments)
    cols = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
    new = np.concatenate([np.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    starts = np.maximum.accumulate(np.where(new, cols, 0), axis=1)
    return {"segments": segments, "positions": (cols - starts).astype(np.int32)}


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int = 0):
    """Yields the whole split in order as {"inputs", "targets", "mask"} batches.

    Sequences tile the stream; the tail is a shorter sequence and the last batch
    is padded with masked rows, so every token is scored exactly once.
    """
    n = len(tokens) - 1
    starts = list(range(0, n, seq_len))
    for b, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches and b >= max_batches:
            return
        inputs = np.zeros((batch_size, seq_len), np.int32)
        targets = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), bool)
        for r, s in enumerate(starts[i : i + batch_size]):
            length = min(seq_len, n - s)
            inputs[r, :length] = tokens[s : s + length]
            targets[r, :length] = tokens[s + 1 : s + 1 + length]
            mask[r, :length] = True
        yield {"inputs": inputs, "targets": targets, "mask": mask}
