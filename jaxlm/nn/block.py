"""Transformer decoder block: attention and feed-forward, each with a residual.

pre-norm (GPT-2, LLaMA):   x + f(norm(x))
post-norm (Vaswani 2017):  norm(x + f(x))
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.attention import Attention
from jaxlm.nn.mlp import MLP
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import dtype_of


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # GPT-2: residual output projections scaled by 1/sqrt(2L) at init.
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = Norm(cfg.d_model, **norm)
        self.attn = Attention(
            cfg.d_model,
            cfg.num_heads,
            cfg.kv_heads,
            cfg.dim_per_head,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            rope=cfg.rope,
            implementation=cfg.attention_impl,
            std=cfg.init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.mlp_norm = Norm(cfg.d_model, **norm)
        self.mlp = MLP(
            cfg.d_model,
            cfg.mlp_dim,
            kind=cfg.mlp,
            act=cfg.activation,
            bias=cfg.mlp_bias,
            std=cfg.init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x, positions, mask, cache=None, cache_index=None, bias=None) -> tuple[jax.Array, dict | None]:
        """x: (B, T, D) -> (B, T, D); see `Attention` for the other arguments."""
        if self.pre_norm:
            h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, bias)
            x = x + h
            return x + self.mlp(self.mlp_norm(x)), cache
        h, cache = self.attn(x, positions, mask, cache, cache_index, bias)
        x = self.attn_norm(x + h)
        return self.mlp_norm(x + self.mlp(x)), cache
