"""From a config's `data` section to training batches and validation batches, per objective.

clm / mlm: documents packed into one token stream (`PackedLoader`, `eval_batches`); a corpus is prepared once
into memory-mapped token files (`prepared_text`), which the loaders window directly.
span: the same stream, windows span-corrupted for an encoder-decoder (T5).
seq2seq: `source<TAB>target` pairs (the last `val_fraction` of them validate).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxlm.config import (
    INSTRUCTION_OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    RL_OBJECTIVES,
    TEXT_OBJECTIVES,
    Config,
    ConfigError,
)
from jaxlm.data.chat import read_template
from jaxlm.data.instructions import RowLoader, encode_example, pack, read_jsonl, row_batches
from jaxlm.data.loader import MixtureLoader, PackedLoader, document_segments, eval_batches, pack_documents
from jaxlm.data.preferences import encode_pair, pair_rows, read_preferences
from jaxlm.data.prepare import (
    Prepared,
    TextSource,
    cached_tokenizer,
    ensure_prepared,
    is_prepared,
    open_prepared,
    tokenizer_sha,
)
from jaxlm.data.prompts import read_prompts
from jaxlm.data.seq2seq import Seq2SeqLoader, read_pairs, span_target_len
from jaxlm.data.shakespeare_instructions import NAME as EMBEDDED_INSTRUCTIONS
from jaxlm.data.shakespeare_instructions import VERSE, instruction_splits, verse_splits
from jaxlm.data.shakespeare_preferences import NAME as EMBEDDED_PREFERENCES
from jaxlm.data.shakespeare_preferences import preference_splits
from jaxlm.data.sources import kind_of

SENTINELS = 100  # T5's extra ids


def load_splits(cfg: Config, tokenizer=None, *, progress: bool = False):
    """(train, validation): token streams of a text corpus (clm, mlm, span: memory-mapped, prepared with
    `tokenizer`), lists of (source, target) text pairs (seq2seq), of instruction examples (sft, prefix_lm), of
    preference pairs (reward, dpo) or of prompts (ppo, grpo)."""
    objective = cfg.train.objective
    if objective in TEXT_OBJECTIVES:
        prepared = prepared_text(cfg, tokenizer, progress=progress)
        if not cfg.data.mixture:
            return prepared[0].tokens("train"), prepared[0].tokens("val")
        _, weights, names = zip(*text_sources(cfg))
        val = np.concatenate([p.tokens("val") for p in prepared])  # held-out text is small: all of it, in memory
        return Mixture([p.tokens("train") for p in prepared], list(weights), list(names)), val
    if objective in RL_OBJECTIVES:  # prompts
        if cfg.data.source == EMBEDDED_INSTRUCTIONS:
            return instruction_splits()
        if cfg.data.source == VERSE:
            return verse_splits()
        if kind_of(Path(cfg.data.source)) != "jsonl":
            raise ConfigError(
                f"train.objective={objective} reads prompts: data.source must be {EMBEDDED_INSTRUCTIONS!r}, "
                f"{VERSE!r} or a .jsonl file of prompts, got {cfg.data.source!r}"
            )
        return _read_split(cfg, read_prompts, "prompts")
    if objective in INSTRUCTION_OBJECTIVES + PREFERENCE_OBJECTIVES:
        preferences = objective in PREFERENCE_OBJECTIVES
        embedded, read = (
            (EMBEDDED_PREFERENCES, read_preferences) if preferences else (EMBEDDED_INSTRUCTIONS, read_jsonl)
        )
        if cfg.data.source == embedded:
            return preference_splits() if preferences else instruction_splits()
        if kind_of(Path(cfg.data.source)) != "jsonl":
            kind = "preference pairs" if preferences else "instruction data"
            raise ConfigError(
                f"train.objective={objective} reads {kind}: data.source must be {embedded!r} or a .jsonl file, "
                f"got {cfg.data.source!r}"
            )
        return _read_split(cfg, read, "pairs" if preferences else "examples")
    if cfg.data.source == EMBEDDED_INSTRUCTIONS:
        raise ConfigError(f"data.source={EMBEDDED_INSTRUCTIONS} is instruction data: use train.objective=sft")
    if cfg.data.source == EMBEDDED_PREFERENCES:
        raise ConfigError(f"data.source={EMBEDDED_PREFERENCES} is preference data: use train.objective=reward or dpo")
    pairs = read_pairs(cfg.data.source)  # seq2seq
    n_val = max(1, int(len(pairs) * cfg.data.val_fraction))
    return pairs[:-n_val], pairs[-n_val:]


def text_sources(cfg: Config) -> list[tuple[TextSource, float, str]]:
    """(corpus, weight, name) of data.source, or of each data.mixture entry."""
    d = cfg.data
    if not d.mixture:
        return [(TextSource(d.source, d.val_fraction, d.text_field, d.max_bad_records), 1.0, "")]
    return [
        (TextSource(m.source, d.val_fraction, m.text_field or d.text_field, d.max_bad_records), m.weight, m.label)
        for m in d.mixture
    ]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The training streams of a data.mixture (MixtureLoader windows them)."""

    tokens: list
    weights: list[float]
    names: list[str]


def prepared_text(cfg: Config, tokenizer, *, progress: bool = False) -> list[Prepared]:
    """The run's corpora (data.source, or each of data.mixture) tokenized by `tokenizer`: a source that is a
    prepared directory as it is (it must hold this tokenizer's ids), else its cached prepared copy, made the
    first time."""
    out = []
    for text, _, _ in text_sources(cfg):
        if is_prepared(text.source):
            prepared = open_prepared(text.source)
            if prepared.index["tokenizer_sha256"] != tokenizer_sha(tokenizer):
                raise ConfigError(
                    f"data source {text.source} was prepared with another tokenizer than this run's; prepare it "
                    "again with this run's tokenizer.json (jaxlm data prepare SOURCE --tokenizer RUN/tokenizer.json)"
                )
        else:
            prepared = ensure_prepared(text, tokenizer, cache_dir=cfg.data.cache_dir, progress=progress)
        out.append(prepared)
    return out


def text_tokenizer(cfg: Config):
    """A fresh run's tokenizer for its text: a prepared directory's own (the first source's), bytes, or a BPE
    trained (once per corpus, cached) on data.tokenizer_sample_mb of the training splits, by weight."""
    d = cfg.data
    texts = text_sources(cfg)
    if is_prepared(texts[0][0].source):
        return open_prepared(texts[0][0].source).tokenizer
    return cached_tokenizer(
        [(t, w) for t, w, _ in texts],
        d.tokenizer,
        cfg.model.vocab_size - reserved_ids(cfg),
        mask=cfg.train.objective == "mlm",
        sample_mb=d.tokenizer_sample_mb,
        cache_dir=d.cache_dir,
    )


def _read_split(cfg: Config, read, items: str) -> tuple[list[dict], list[dict]]:
    """(training, validation) records of data.source: validation from data.val_source, else its last val_fraction."""
    records = read(cfg.data.source)
    if cfg.data.val_source:
        return records, read(cfg.data.val_source)
    n_val = max(1, int(len(records) * cfg.data.val_fraction))
    if n_val >= len(records):
        raise ConfigError(f"{cfg.data.source} has too few {items} to hold out validation; set data.val_source")
    return records[:-n_val], records[-n_val:]


def tokenizer_texts(split) -> list[str]:
    return [t for item in split for t in (item if isinstance(item, tuple) else (item,))]


def instruction_rows(cfg: Config, tokenizer, examples: list[dict], seed: int) -> dict:
    """Packed rows (`jaxlm.data.instructions.pack`) of examples; without packing, no segment ids."""
    template = read_template(cfg.data.chat_template, tokenizer) if any("messages" in e for e in examples) else None
    encoded = [encode_example(e, tokenizer, template) for e in examples]
    d = cfg.data
    rows = pack(encoded, seq_len=d.seq_len, pack=d.pack, too_long=d.too_long, seed=seed)
    if not d.pack:
        rows.pop("segments")
    return rows


def preference_rows(cfg: Config, tokenizer, pairs: list[dict]) -> dict:
    """(N, 2, seq_len) rows of preference pairs (`jaxlm.data.preferences.pair_rows`); a policy's completions
    end with end-of-text, a reward model's do not (it scores their last token)."""
    template = (
        read_template(cfg.data.chat_template, tokenizer) if any(isinstance(p["prompt"], list) for p in pairs) else None
    )
    eos = cfg.train.objective != "reward"
    encoded = [encode_pair(p, tokenizer, template, eos=eos) for p in pairs]
    return pair_rows(encoded, seq_len=cfg.data.seq_len, too_long=cfg.data.too_long)


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
    if tc.objective in INSTRUCTION_OBJECTIVES + PREFERENCE_OBJECTIVES:
        if tc.objective in PREFERENCE_OBJECTIVES:
            rows_of = lambda split: preference_rows(cfg, tokenizer, split)  # noqa: E731
        else:
            rows_of = lambda split: instruction_rows(cfg, tokenizer, split, cfg.data.seed)  # noqa: E731
        loader = None
        if train is not None:
            data = rows_of(train)
            loader = RowLoader(data, batch_size=tc.batch_size, seed=cfg.data.seed, rows=rows)
        val_rows = rows_of(val)
        return loader, lambda max_batches: row_batches(val_rows, tc.batch_size, max_batches)

    def encode(docs):  # token arrays (prepared corpora) as they are; documents packed
        if isinstance(docs, np.ndarray):
            return docs
        return pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id)

    if tc.objective in ("clm", "mlm"):
        val_tokens = encode(val)
        if len(val_tokens) < 2:
            raise ConfigError(f"data.source {cfg.data.source!r} leaves no validation text; raise data.val_fraction")
        loader = None
        if train is not None:
            if isinstance(train, Mixture):
                loader = MixtureLoader(train.tokens, train.weights, names=train.names, seq_len=seq_len,
                                       batch_size=tc.batch_size, seed=cfg.data.seed, rows=rows)  # fmt: skip
            else:
                loader = PackedLoader(
                    encode(train), seq_len=seq_len, batch_size=tc.batch_size, seed=cfg.data.seed, rows=rows
                )
        val_batches = lambda max_batches: eval_batches(  # noqa: E731
            val_tokens, seq_len=seq_len, batch_size=tc.batch_size, max_batches=max_batches
        )
        if cfg.data.document_mask:  # segment ids and positions per document, computed per batch
            with_docs = lambda b: {**b, **document_segments(b["inputs"], tokenizer.eos_id)}  # noqa: E731
            loader = None if loader is None else MappedLoader(loader, with_docs)
            return loader, lambda max_batches: map(with_docs, val_batches(max_batches))
        return loader, val_batches

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


class MappedLoader:
    """A loader whose batches pass through `fn`; state and restore are the inner loader's."""

    def __init__(self, loader, fn):
        self.loader, self.fn = loader, fn
        self.state, self.restore = loader.state, loader.restore

    def __getattr__(self, name):  # the inner loader's other attributes (a mixture's `consumed`)
        return getattr(self.__dict__["loader"], name)

    def __iter__(self):
        return self

    def __next__(self):
        return self.fn(next(self.loader))
