"""From a config's `data` section to training batches and validation batches, per objective.

clm / mlm: documents packed into one token stream (`PackedLoader`, `eval_batches`).
span: the same stream, windows span-corrupted for an encoder-decoder (T5).
seq2seq: `source<TAB>target` pairs (the last `val_fraction` of them validate).
"""

from __future__ import annotations

from jaxlm.config import Config, ConfigError
from jaxlm.data.corpus import load_corpus
from jaxlm.data.loader import PackedLoader, eval_batches, pack_documents
from jaxlm.data.seq2seq import Seq2SeqLoader, read_pairs, span_target_len

SENTINELS = 100  # T5's extra ids


def load_splits(cfg: Config):
    """(train, validation): lists of documents, or of (source, target) text pairs for seq2seq."""
    if cfg.train.objective == "seq2seq":
        pairs = read_pairs(cfg.data.source)
        n_val = max(1, int(len(pairs) * cfg.data.val_fraction))
        return pairs[:-n_val], pairs[-n_val:]
    return load_corpus(cfg.data.source, cfg.data.val_fraction)


def tokenizer_texts(split) -> list[str]:
    return [t for item in split for t in (item if isinstance(item, tuple) else (item,))]


def reserved_ids(cfg: Config) -> int:
    """Ids kept free above the tokenizer's vocabulary (span corruption's sentinels)."""
    return SENTINELS if cfg.train.objective == "span" and cfg.data.tokenizer == "bpe" else 0


def target_len(cfg: Config) -> int:
    tc = cfg.train
    if tc.target_len:
        return tc.target_len
    if tc.objective == "span":
        return span_target_len(cfg.data.seq_len, tc.mask_rate, tc.mean_span)
    return cfg.data.seq_len


def make_batches(cfg: Config, tokenizer, train, val, rows=None):
    """(training loader or None when `train` is None, eval(max_batches) -> iterator of validation batches)."""
    tc, seq_len = cfg.train, cfg.data.seq_len
    encode = lambda docs: pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id)  # noqa: E731
    if tc.objective in ("clm", "mlm"):
        val_tokens = encode(val)
        if len(val_tokens) < 2:
            raise ConfigError(f"data.source {cfg.data.source!r} leaves no validation text; raise data.val_fraction")
        loader = None
        if train is not None:
            loader = PackedLoader(
                encode(train), seq_len=seq_len, batch_size=tc.batch_size, seed=cfg.data.seed, rows=rows
            )
        return loader, lambda max_batches: eval_batches(
            val_tokens, seq_len=seq_len, batch_size=tc.batch_size, max_batches=max_batches
        )

    eos = tokenizer.eos_id
    common = dict(
        seq_len=seq_len,
        target_len=target_len(cfg),
        batch_size=tc.batch_size,
        start_id=eos if cfg.model.decoder_start_id < 0 else cfg.model.decoder_start_id,
        eos_id=eos,
        sentinels=list(range(cfg.model.vocab_size - 1, tokenizer.vocab_size - 1, -1))[:SENTINELS],
        rate=tc.mask_rate,
        mean_span=tc.mean_span,
        seed=cfg.data.seed,
    )

    def data(split):
        if tc.objective == "span":
            return {"tokens": encode(split)}
        src = tokenizer.encode_batch([s for s, _ in split])
        tgt = tokenizer.encode_batch([t for _, t in split])
        return {"pairs": [(s, t + [eos]) for s, t in zip(src, tgt)]}

    loader = None if train is None else Seq2SeqLoader(**data(train), **common, rows=rows)
    val_loader = Seq2SeqLoader(**data(val), **common, training=False)
    return loader, val_loader.eval_batches
