"""Token embedding (with tied read-out) and learned absolute positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import constrain
from jaxlm.nn.param import normal_param
from jaxlm.nn.quantized import QuantizedTable
from jaxlm.ops.dense import dense


class Embed(nnx.Module):
    """Token table (V, D). `attend` computes logits against the same table (tied)."""

    def __init__(self, vocab_size: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), std, param_dtype)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, D)."""
        if isinstance(self.embedding, QuantizedTable):  # `--weights`
            x = self.embedding.lookup(tokens, self.dtype)
        else:  # gather whole rows: the FSDP-split `embed` dim is all-gathered first (a vocab split stays put)
            table = constrain(self.embedding[...], ("vocab", "embed"))
            x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        lora = getattr(self, "lora_embedding", None)  # jaxlm.nn.adapters.EmbeddingLoRA
        delta = None if lora is None else lora(tokens, self.dtype)
        return x if delta is None else x + delta

    def attend(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, V) logits."""
        if isinstance(self.embedding, QuantizedTable):
            return self.embedding.attend(x.astype(self.dtype))
        return dense(x, self.embedding[...].astype(self.dtype).T)  # BTD,VD->BTV


class LearnedPositions(nnx.Module):
    """Absolute position table (max_len, D), as in GPT-2 and BERT."""

    def __init__(self, max_len: int, dim: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (max_len, dim), (None, "embed"), std, param_dtype)
        self.dtype = dtype

    def __call__(self, positions: jax.Array) -> jax.Array:
        """(B, T) int in [0, max_len) -> (B, T, D)."""
        return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)
