"""The model a `ModelConfig` describes: one stack (`TransformerLM`) or two (`EncoderDecoderLM`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.seq2seq import EncoderDecoderLM
from jaxlm.nn.transformer import TransformerLM


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> TransformerLM | EncoderDecoderLM:
    if cfg.decoder_layers:
        return EncoderDecoderLM(cfg, rngs=rngs)
    return TransformerLM(cfg, rngs=rngs)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (jax.eval_shape: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(state))
