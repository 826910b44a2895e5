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


def active_params(cfg: ModelConfig) -> int:
    """Parameters that act on each token: all but the experts a token is not routed to (equal to
    `count_params` for a dense model)."""
    n = count_params(cfg)
    if cfg.num_experts:
        D, F, gated = cfg.d_model, cfg.expert_hidden, cfg.mlp == "gated"
        per_expert = D * F * (3 if gated else 2) + (((2 if gated else 1) * F + D) if cfg.mlp_bias else 0)
        stacks = [cfg.num_layers] + ([cfg.decoder_layers] if cfg.decoder_layers else [])
        layers = sum(n_layers - cfg.first_dense_layers for n_layers in stacks)  # the layers with experts
        n -= layers * (cfg.num_experts - cfg.experts_per_token) * per_expert
    return n
