"""What every model class shares around its layer stacks: the token embedding (and token types) on the way
in, the read-out (tied or own, BERT's MLM transform, soft-capping) and BERT's pooler on the way out."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import constrain
from jaxlm.config import ModelConfig
from jaxlm.nn.adapters import project
from jaxlm.nn.embed import Embed
from jaxlm.nn.norm import norm_for
from jaxlm.nn.param import const_param, dtype_of, normal_param
from jaxlm.ops.dense import dense
from jaxlm.ops.losses import chunked_readout
from jaxlm.ops.mlp import activation


class LanguageModel(nnx.Module):
    """Base of `TransformerLM` and `EncoderDecoderLM`: builds and runs the input and output layers."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, build_stacks: Callable[[], None]):
        """build_stacks: creates the subclass's layer stacks, between the embedding and the read-out, so that a
        seed draws parameters in jaxlm's one order: embedding, stacks, read-out, token types, heads."""
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        D, std = cfg.d_model, cfg.init_std
        self.embed = Embed(cfg.vocab_size, D, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        build_stacks()
        self.lm_head = (
            None
            if cfg.tie_embeddings or cfg.head == "score"
            else normal_param(rngs, (D, cfg.vocab_size), ("embed", "vocab"), std, param_dtype)
        )
        if cfg.head == "score":  # a reward model's read-out (transformers' `score` of ...ForSequenceClassification)
            self.score = normal_param(rngs, (D, cfg.num_labels), ("embed", None), std, param_dtype)
        self.token_types = (
            normal_param(rngs, (cfg.type_vocab_size, D), (None, "embed"), std, param_dtype)
            if cfg.type_vocab_size
            else None
        )
        if cfg.head == "mlm":  # BERT: dense -> activation -> norm, then the tied read-out plus a bias
            self.head_dense = normal_param(rngs, (D, D), ("embed", "embed"), std, param_dtype)
            self.head_dense_bias = const_param((D,), ("embed",), 0.0, param_dtype)
            self.head_norm = norm_for(cfg)
            self.head_bias = const_param((cfg.vocab_size,), ("vocab",), 0.0, param_dtype)
        if cfg.pooler:
            self.pool_dense = normal_param(rngs, (D, D), ("embed", "embed"), std, param_dtype)
            self.pool_bias = const_param((D,), ("embed",), 0.0, param_dtype)
        if cfg.value_head:  # PPO's critic; zeros: values start at 0 (and no draw shifts the other parameters)
            self.value_head = const_param((D, 1), ("embed", None), 0.0, param_dtype)
            self.value_bias = const_param((1,), (None,), 0.0, param_dtype)

    def embed_tokens(self, tokens: jax.Array, token_types: jax.Array | None = None) -> jax.Array:
        """(B, T) ids -> (B, T, D): the token embedding, times sqrt(D) with `embed_scale`, plus token types."""
        x = self.embed(tokens)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)
        if self.token_types is not None:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + jnp.take(self.token_types[...], types, axis=0).astype(self.dtype)
        return x

    def logits(self, x: jax.Array) -> jax.Array:
        """(B, T, D) final hidden states -> (B, T, V) float32 logits; head=score: (B, T, num_labels) scores."""
        cfg = self.cfg
        c = lambda p: p[...].astype(self.dtype)  # noqa: E731
        if cfg.scale_readout:
            x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
        if cfg.head == "score":
            return dense(x, c(self.score)).astype(jnp.float32)  # BTD,DC->BTC
        if cfg.head == "mlm":
            h = dense(x, c(self.head_dense)) + c(self.head_dense_bias)  # BTD,DE->BTE
            x = self.head_norm(activation(cfg.activation)(h))
        logits = self.embed.attend(x) if self.lm_head is None else project(self, "lm_head", x)  # BTD,DV->BTV
        if cfg.head == "mlm":
            logits = logits + c(self.head_bias)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return constrain(logits, ("batch", "seq", "vocab"))

    def readout(self, fn: Callable, x: jax.Array, *per_token: jax.Array):
        """fn(logits, *per_token) of final hidden states x (B, T, D): per-token statistics (B, T) of the logits
        (log-probs, losses), computed `cfg.logits_chunk` positions at a time (0: all at once), so that training
        need not hold the (B, T, V) logits (`jaxlm.ops.losses.chunked_readout`)."""
        return chunked_readout(fn, self.logits, x, *per_token, chunk=self.cfg.logits_chunk or x.shape[1])

    def values(self, x: jax.Array) -> jax.Array:
        """The value head: (B, T, D) final hidden states -> (B, T) float32 values."""
        v = dense(x, self.value_head[...].astype(self.dtype)) + self.value_bias[...].astype(self.dtype)  # BTD,DC->BTC
        return v[..., 0].astype(jnp.float32)

    def pool(self, x: jax.Array) -> jax.Array:
        """BERT's pooler: tanh(dense(first token)). (B, T, D) -> (B, D)."""
        h = dense(x[:, 0], self.pool_dense[...].astype(self.dtype))  # BD,DE->BE
        return jnp.tanh(h + self.pool_bias[...].astype(self.dtype))


def at_positions(x: jax.Array, last: jax.Array) -> jax.Array:
    """(B, T, D) states -> (B, 1, D): each row's state at its position last[b]."""
    return jnp.take_along_axis(x, last[:, None, None], axis=1)
