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


class Batches:
    """An iterator over `batch(k)`, k = 0, 1, ... from `position` (the batches served: the loaders' whole state)."""

    position = 0

    def batch(self, k: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self.position)
        self.position += 1
        return b


class PackedLoader(Batches):
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
        seqs = self.tokens[idx].astype(np.int32)  # a prepared corpus is uint16 / uint32 on disk
        return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


MIXTURE_PERIOD = 4096  # windows after which a mixture's schedule repeats (its weights to within 1 / this)


def mixture_schedule(weights, period: int = MIXTURE_PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source (P,), index (P,), counts (S,)) of a repeating schedule of P windows: window j is the
    index[j]-th window of source[j] within the period; each source gets its share of every prefix to within
    one window (smooth weighted round robin: each window goes to the source furthest behind its share)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    credit, counts = np.zeros(len(w)), np.zeros(len(w), np.int64)
    source, index = np.empty(period, np.int64), np.empty(period, np.int64)
    for j in range(period):
        credit += w
        s = int(np.argmax(credit))
        credit[s] -= 1.0
        source[j], index[j] = s, counts[s]
        counts[s] += 1
    return source, index, counts


class MixtureLoader(Batches):
    """Batches of windows from several token streams, interleaved by weight (`mixture_schedule`).

    Global window j (row r of batch k: j = k * batch_size + r) is window i of its source's own stream, which
    runs through epochs of its windows in an order (and offset) drawn from (seed, source, epoch), as
    `PackedLoader`'s. So batch k is a pure function of (seed, k), and each process builds only its rows."""

    def __init__(self, tokens: list, weights, *, seq_len: int, batch_size: int, seed: int = 0,
                 names: list[str] | None = None, rows: tuple[int, int] | None = None):  # fmt: skip
        self.tokens, self.seq_len, self.batch_size, self.seed = list(tokens), seq_len, batch_size, seed
        self.names = names or [str(i) for i in range(len(self.tokens))]
        self.weights = [float(w) for w in weights]
        self.rows = rows or (0, batch_size)
        self.windows = [(len(t) - 1) // seq_len - 1 for t in self.tokens]
        for name, n, t in zip(self.names, self.windows, self.tokens):
            if n < 1:
                raise DataError(
                    f"mixture source {name!r} has {len(t)} tokens: too few for a {seq_len + 1}-token window"
                )
        self.source, self.index, self.counts = mixture_schedule(self.weights)
        self._before = np.zeros((len(self.source) + 1, len(self.tokens)), np.int64)  # windows per source before j
        self._before[np.arange(1, len(self.source) + 1), self.source] = 1
        self._before = np.cumsum(self._before, axis=0)
        self.position = 0
        self._orders: dict[int, tuple[int, int, np.ndarray]] = {}  # source -> (epoch, offset, order)

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "weights": self.weights,
                "num_tokens": [int(len(t)) for t in self.tokens]}  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("num_tokens") != [int(len(t)) for t in self.tokens] or state.get("seed") != self.seed:
            raise DataError(
                f"checkpointed data position was saved for sources of {state.get('num_tokens')} tokens with seed "
                f"{state.get('seed')}, but the mixture now has {[len(t) for t in self.tokens]} with seed "
                f"{self.seed}: a corpus, the tokenizer or data.seed changed since the checkpoint"
            )
        if state.get("weights") != self.weights:
            raise DataError(f"checkpointed mixture weights {state.get('weights')} differ from {self.weights}")
        self.position = int(state["position"])

    def windows_before(self, j: int) -> np.ndarray:
        """Windows of each source among global windows [0, j)."""
        period = len(self.source)
        return (j // period) * self.counts + self._before[j % period]

    def consumed(self, k: int) -> dict[str, float]:
        """Tokens and epochs of each source that batches [0, k) trained on (the metrics' data/ figures)."""
        n = self.windows_before(k * self.batch_size)
        out = {}
        for name, windows, w in zip(self.names, self.windows, n):
            out[f"data/{name}_tokens"] = int(w) * self.seq_len
            out[f"data/{name}_epochs"] = float(w) / windows
        return out

    def _window(self, s: int, i: int) -> np.ndarray:
        epoch, p = divmod(i, self.windows[s])
        cached = self._orders.get(s)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, s, epoch])
            cached = (epoch, int(rng.integers(self.seq_len)), rng.permutation(self.windows[s]))
            self._orders[s] = cached
        start = cached[1] + int(cached[2][p]) * self.seq_len
        return np.asarray(self.tokens[s][start : start + self.seq_len + 1], np.int32)

    def batch(self, k: int) -> dict[str, np.ndarray]:
        period = len(self.source)
        seqs = []
        for r in range(*self.rows):
            j = k * self.batch_size + r
            s, q = int(self.source[j % period]), j // period
            seqs.append(self._window(s, q * int(self.counts[s]) + int(self.index[j % period])))
        seqs = np.stack(seqs)
        return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:]}


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
