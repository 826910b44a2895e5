"""Decoder-only language model (GPT-2 and LLaMA from one `ModelConfig`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.block import Block
from jaxlm.nn.embed import Embed, LearnedPositions
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import dtype_of, normal_param
from jaxlm.ops.attention import attention_mask
from jaxlm.ops.positions import sinusoidal_positions


class DecoderLM(nnx.Module):
    """tokens -> logits, optionally through a KV cache.

    Training: `logits, _ = model(tokens)`.
    Decoding: `cache = model.init_cache(B, S)`, then
    `logits, cache = model(tokens, positions, valid, cache=cache, cache_index=i)`
    writes the T new tokens at cache slots [i, i + T).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.positions = (
            LearnedPositions(
                cfg.max_seq_len, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if cfg.position == "learned"
            else None
        )
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = (
            Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
            if cfg.norm_position == "pre"
            else None
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, param_dtype)
        )

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        """Empty cache: per-layer K/V and the position of each slot (-1 = empty)."""
        length = length or self.cfg.max_seq_len
        return {
            "pos": jnp.full((batch, length), -1, jnp.int32),
            "layers": [layer.attn.init_cache(batch, length, self.dtype) for layer in self.layers],
        }

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        *,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Causal forward pass.

        Args:
          tokens: (B, T) int.
          positions: (B, T) int; defaults to 0..T-1.
          valid: (B, T) bool, False for padding tokens (never attended to).
          cache: from `init_cache`; its slots [cache_index, cache_index + T) are written.
          cache_index: int scalar (may be traced).

        Returns:
          logits (B, T, V) in float32, and the updated cache (None without one).
        """
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if valid is None:
            valid = jnp.ones((B, T), bool)
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(self.dtype)

        window = cfg.sliding_window or None
        if cache is None:
            mask = attention_mask(positions, positions, kv_valid=valid, sliding_window=window)
            layer_caches = [None] * len(self.layers)
        else:
            slot_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
            kv_pos = jax.lax.dynamic_update_slice(cache["pos"], slot_pos, (0, cache_index))
            mask = attention_mask(positions, kv_pos, kv_valid=kv_pos >= 0, sliding_window=window)
            layer_caches = cache["layers"]

        new_caches = []
        for layer, layer_cache in zip(self.layers, layer_caches):
            x, layer_cache = layer(x, positions, mask, layer_cache, cache_index)
            new_caches.append(layer_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(self.dtype))
        new_cache = None if cache is None else {"pos": kv_pos, "layers": new_caches}
        return logits.astype(jnp.float32), new_cache


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (jax.eval_shape: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree.leaves(state))
