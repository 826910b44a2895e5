"""Fine-tuning starts from weights: `finetune.init_from` names a jaxlm run directory or a Hugging Face directory.

`jaxlm.train.run_dir.load_base(path)` reads its model config, tokenizer and parameters; `resolve(cfg, base)` takes the model's
shape from the base (the run's own `model` section may only change how it runs: dropout, remat, scan,
attention implementation) so the resolved config written to the new run names one consistent model.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
from flax import nnx

from jaxlm.config import Config, ConfigError, ModelConfig

log = logging.getLogger(__name__)

# ModelConfig fields a fine-tuning run may set on its own: how the base runs, not what it computes.
RUNTIME_FIELDS = (
    "dropout",
    "attention_dropout",
    "mlp_dropout",
    "remat",
    "scan_layers",
    "attention_impl",
    "attention_block",
    "logits_chunk",
    "dtype",
    "param_dtype",
)

# Context extension (YaRN, position interpolation...) of a RoPE model: the same parameters, a longer window.
CONTEXT_FIELDS = (
    "max_seq_len",
    "rope_scaling",
    "rope_factor",
    "rope_original_max_len",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_truncate",
    "rope_attention_factor",
)


def resolve(cfg: Config, base: ModelConfig) -> Config:
    """cfg with the base's model shape and cfg's runtime fields; ConfigError where cfg.model asks another shape.

    A model key the config sets (`cfg.given`) always counts, even at its default value: `model.dropout: 0.0` on
    a base with dropout 0.1 trains without dropout, and `model.d_model: 512` on a base of 576 is refused. A key
    it leaves out is the base's."""
    default, own = ModelConfig(), cfg.model
    given = {k.split(".", 1)[1] for k in cfg.given if k.startswith("model.")}

    def chosen(name: str) -> bool:  # the run's config set it (in code, with no record of keys: not the default)
        return name in given if cfg.given else getattr(own, name) != getattr(default, name)

    # A language model may become a reward model: its trunk under a new score head (the read-out is dropped).
    heads = ("head", "num_labels") if own.head == "score" and base.head == "lm" else ()
    heads += ("value_head",) if own.value_head and not base.value_head else ()  # PPO adds a critic
    heads += CONTEXT_FIELDS if base.position == "rope" else ()  # learned positions: max_seq_len is a shape
    conflicts = [
        f"model.{f.name}={getattr(own, f.name)!r} (the base has {getattr(base, f.name)!r})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUNTIME_FIELDS + heads and chosen(f.name) and getattr(own, f.name) != getattr(base, f.name)
    ]
    if conflicts:
        raise ConfigError(
            "finetune.init_from sets the model's shape; remove these model keys or use another base: "
            + "; ".join(conflicts)
        )
    runtime = {k: getattr(own, k) for k in RUNTIME_FIELDS + heads if chosen(k)}
    model = dataclasses.replace(base, **{**runtime, "dtype": own.dtype})  # own.dtype: train.precision's
    try:
        return dataclasses.replace(cfg, model=model)  # re-checks everything, sets dtype from train.precision
    except ConfigError as e:
        raise ConfigError(f"with the base model of finetune.init_from: {e}") from None


def grow_vocab(cfg: Config, params: nnx.State, vocab: int) -> tuple[Config, nnx.State]:
    """Room for tokens the tokenizer gained (a chat template's): new rows of the embedding, read-out and
    MLM bias, each the mean of the old ones (as transformers' `resize_token_embeddings`); cfg's vocab_size."""
    old = cfg.model.vocab_size
    if vocab <= old:
        return cfg, params
    log.info("vocabulary %d -> %d (tokens added for the chat template); new rows start at the mean", old, vocab)
    grow = {"embed": 0, "lm_head": 1, "head_bias": 0}  # parameter -> its vocab axis

    def pad(path, x):
        axis = grow.get(path[0].key if hasattr(path[0], "key") else path[0])
        if axis is None or x.shape[axis] != old:
            return x
        mean = np.mean(x, axis=axis, keepdims=True).astype(x.dtype)
        return np.concatenate([x, np.repeat(mean, vocab - old, axis=axis)], axis=axis)

    params = jax.tree_util.tree_map_with_path(pad, params)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)), params


def fit_head(cfg: Config, params: nnx.State, base: ModelConfig) -> nnx.State:
    """The base's parameters for cfg's heads: a language model's trunk under a new score head (normal(0,
    init_std), as transformers initialises `score`) when cfg makes a reward model of it, and a new value head
    (zeros) when cfg adds PPO's critic; else as they are."""
    m = cfg.model
    new_score = m.head == "score" and base.head != "score"
    new_value = m.value_head and not base.value_head
    if not (new_score or new_value):
        return params
    flat = list(nnx.to_flat_state(params))
    dtype = np.asarray(flat[0][1][...]).dtype
    param = lambda x, axes: nnx.Param(np.asarray(x, dtype), out_sharding=axes, eager_sharding=False)  # noqa: E731
    if new_score:
        flat = [(p, v) for p, v in flat if p[0] != "lm_head"]
        score = np.random.default_rng(cfg.train.seed).normal(0.0, m.init_std, (m.d_model, m.num_labels))
        flat.append((("score",), param(score, ("embed", None))))
    if new_value:  # zeros, as the model initialises it
        flat += [(("value_head",), param(np.zeros((m.d_model, 1)), ("embed", None)))]
        flat += [(("value_bias",), param(np.zeros(1), (None,)))]
    return nnx.from_flat_state(flat)
