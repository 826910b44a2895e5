"""Transformer block: self-attention, optional cross-attention (encoder-decoder
decoders), and feed-forward, each with a residual.

pre-norm (GPT-2, LLaMA, T5):   x + f(norm(x))
post-norm (Vaswani 2017, BERT): norm(x + f(x))
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.attention import Attention
from jaxlm.nn.mlp import MLP
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import dtype_of
from jaxlm.ops.dropout import dropout, fold_rows


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        """cross: add cross-attention to encoder states (no positions) between attention and MLP."""
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # GPT-2: residual output projections scaled by 1/sqrt(2L) at init.
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
        self.pre_norm = cfg.norm_position == "pre"
        self.dropout = cfg.dropout  # on each branch's output, before the residual sum
        attention = dict(
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            scale=cfg.attention_scale or None,
            dropout=cfg.attention_dropout,
            implementation=cfg.attention_impl,
            std=cfg.init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        shape = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head)
        self.attn_norm = Norm(cfg.d_model, **norm)
        self.attn = Attention(*shape, rope=cfg.rope, **attention)
        self.cross_norm = Norm(cfg.d_model, **norm) if cross else None
        self.cross = Attention(*shape, rope=None, **attention) if cross else None
        self.mlp_norm = Norm(cfg.d_model, **norm)
        self.mlp = MLP(
            cfg.d_model,
            cfg.mlp_dim,
            kind=cfg.mlp,
            act=cfg.activation,
            bias=cfg.mlp_bias,
            std=cfg.init_std,
            out_std=out_std,
            dropout=cfg.mlp_dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        x,
        positions,
        mask,
        cache=None,
        cache_index=None,
        bias=None,
        memory=None,
        memory_mask=None,
        dropout_keys=None,
        layer=None,
    ) -> tuple[jax.Array, dict | None]:
        """x: (B, T, D) -> (B, T, D); see `Attention` for the other arguments.

        memory: this layer's `Attention.memory_kv` of the encoder states; memory_mask: (B, T, S).
        dropout_keys: (B, 2) this layer's row keys (training), or None: no dropout.
        layer: this layer's index when `cache` is the whole stack's (see `Attention`).
        """
        key = lambda i: fold_rows(dropout_keys, i)  # noqa: E731  one stream per dropout site
        drop = lambda h, i: dropout(h, self.dropout, key(i))  # noqa: E731
        if self.pre_norm:
            h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, bias, key(0), layer)
            x = x + drop(h, 1)
            if self.cross is not None:
                x = x + drop(self.cross.cross(self.cross_norm(x), memory, memory_mask, key(2)), 3)
            return x + drop(self.mlp(self.mlp_norm(x), key(5)), 4), cache
        h, cache = self.attn(x, positions, mask, cache, cache_index, bias, key(0), layer)
        x = self.attn_norm(x + drop(h, 1))
        if self.cross is not None:
            x = self.cross_norm(x + drop(self.cross.cross(x, memory, memory_mask, key(2)), 3))
        return self.mlp_norm(x + drop(self.mlp(x, key(5)), 4)), cache
