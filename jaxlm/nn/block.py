"""Transformer block: self-attention, optional cross-attention (encoder-decoder
decoders), and feed-forward, each a residual branch.

pre-norm (GPT-2, LLaMA, T5):      x + f(norm(x))
pre-norm with post_norms (Gemma): x + post_norm(f(norm(x)))
post-norm (Vaswani 2017, BERT):   norm(x + f(x))
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.attention import Attention
from jaxlm.nn.mla import LatentAttention
from jaxlm.nn.mlp import mlp_for
from jaxlm.nn.moe import MoE
from jaxlm.nn.norm import norm_for
from jaxlm.nn.param import dtype_of
from jaxlm.ops.dropout import dropout, fold_rows

# One dropout stream per site (row keys folded with the number): masks do not depend on which others are on.
DROPOUT_SITES = {
    "attn_weights": 0,
    "attn_out": 1,
    "cross_weights": 2,
    "cross_out": 3,
    "mlp_out": 4,
    "mlp_hidden": 5,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False):
        """cross: add cross-attention to encoder states (no positions) between attention and MLP."""
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # GPT-2: residual output projections scaled by 1/sqrt(2L) at init.
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.pre_norm = cfg.norm_position == "pre"
        self.dropout = cfg.dropout  # on each branch's output, before the residual sum
        qk_norm = None
        if cfg.qk_norm:  # RMSNorm over head_dim with the model's offset (Qwen3: w, Gemma 3: 1 + w)
            qk_norm = dict(kind="rmsnorm", eps=cfg.norm_eps, bias=False, param_dtype=param_dtype)
            qk_norm["offset"] = cfg.norm_offset
        attention = dict(
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            scale=cfg.attention_scale or None,
            dropout=cfg.attention_dropout,
            qk_norm=qk_norm,
            softcap=cfg.attn_logit_softcap,
            sinks=cfg.attention_sinks,
            implementation=cfg.attention_impl,
            block_size=cfg.attention_block,
            std=cfg.init_std,
            out_std=out_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        shape = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head)
        self.attn_norm = norm_for(cfg)
        if cfg.kv_lora_rank:  # multi-head latent attention (DeepSeek)
            self.attn = LatentAttention(cfg, out_std=out_std, rngs=rngs)
        else:
            self.attn = Attention(*shape, rope=cfg.rope, local_rope=cfg.local_rope, **attention)
        self.cross_norm = norm_for(cfg) if cross else None
        self.cross = Attention(*shape, rope=None, **attention) if cross else None
        self.mlp_norm = norm_for(cfg)
        experts = dict(std=cfg.init_std, out_std=out_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.moe = MoE(cfg, **experts) if cfg.num_experts else None
        self.mlp = (
            None if cfg.num_experts else mlp_for(cfg, cfg.mlp_dim, out_std=out_std, dropout=cfg.mlp_dropout, rngs=rngs)
        )
        post = cfg.post_norms and self.pre_norm
        self.attn_post_norm = norm_for(cfg) if post else None
        self.cross_post_norm = norm_for(cfg) if post and cross else None
        self.mlp_post_norm = norm_for(cfg) if post else None

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        mask: jax.Array,
        bias: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
        layer: jax.Array | None = None,
        local: jax.Array | bool = False,
        memory: dict | None = None,
        memory_mask: jax.Array | None = None,
        dropout_keys: jax.Array | None = None,
    ) -> tuple[jax.Array, dict | None, dict | None]:
        """x: (B, T, D) -> (B, T, D), the updated cache, and the router's statistics (`MoE`; None without experts);
        see `Attention` for the attention inputs.

        memory: this layer's `Attention.memory_kv` of the encoder states; memory_mask: (B, T, S).
        local: whether this layer attends within the sliding window (selects its RoPE base).
        dropout_keys: (B, 2) this layer's row keys (training), or None: no dropout.
        """
        key = lambda site: fold_rows(dropout_keys, DROPOUT_SITES[site])  # noqa: E731

        def branch(x, norm, post_norm, f, site):
            h = f(norm(x) if self.pre_norm else x)
            if post_norm is not None:
                h = post_norm(h)
            x = x + dropout(h, self.dropout, key(site))
            return x if self.pre_norm else norm(x)

        def attend(h):
            nonlocal cache
            h, cache = self.attn(
                h,
                positions=positions,
                mask=mask,
                cache=cache,
                cache_index=cache_index,
                bias=bias,
                dropout_keys=key("attn_weights"),
                layer=layer,
                local=local,
            )
            return h

        x = branch(x, self.attn_norm, self.attn_post_norm, attend, "attn_out")
        if self.cross is not None:
            cross = lambda h: self.cross.cross(h, memory, memory_mask, key("cross_weights"))  # noqa: E731
            x = branch(x, self.cross_norm, self.cross_post_norm, cross, "cross_out")
        stats = None

        def mlp(h):
            nonlocal stats
            if self.moe is None:
                return self.mlp(h, key("mlp_hidden"))
            h, stats = self.moe(h, key("mlp_hidden"), dropless=cache is not None)
            return h

        return branch(x, self.mlp_norm, self.mlp_post_norm, mlp, "mlp_out"), cache, stats
