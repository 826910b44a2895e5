"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a small latent per token, and the
KV cache holds that latent instead of per-head keys and values.

Per token: c = norm(x · W_kv_a) (kv_lora_rank R values) and one RoPE key k_r = rope(x · W_kr) (qk_rope_head_dim
Hr values, shared by the heads: "decoupled" RoPE). Each head's key is [c · W_k_nope, k_r] and its value
c · W_v (W_kv_b holds both). Queries are x · W_q, or through their own low-rank bottleneck
q = norm(x · W_q_a) · W_q_b (q_lora_rank); each is [q_nope (Hn), rope(q_r) (Hr)].
The cache stores c in "k" (Z slots x 1 x R) and k_r in "v" (Z x 1 x Hr): R + Hr values a token a layer, against
2 K H for grouped-query attention.

Two ways to attend, equal in exact arithmetic:
- expanded (training, prefill): every key and value from the latents, then attention over N heads of Hn + Hr;
- absorbed (decoding a few tokens against a long cache): W_k_nope folds into the query, q_nope W_k^T (N x R),
  and W_v into the output, so attention runs as one shared key/value head over the latents themselves
  (multi-query attention of width R + Hr) and no per-head key or value of the cache is ever formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.adapters import project
from jaxlm.nn.attention import attend, rope_tables
from jaxlm.nn.norm import norm_for
from jaxlm.nn.param import const_param, dtype_of, normal_param
from jaxlm.ops.cache import paged_read, paged_write
from jaxlm.ops.dense import dense
from jaxlm.ops.dropout import fold_rows
from jaxlm.ops.positions import apply_rope

ABSORB_BELOW = 16  # decoding steps of at most this many tokens attend in the absorbed form


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
        N, R, Rq, D = cfg.num_heads, cfg.kv_lora_rank, cfg.q_lora_rank, cfg.d_model
        Hn, Hr, Hv = cfg.mla_nope_dim, cfg.qk_rope_head_dim, cfg.mla_v_dim
        std, param_dtype = cfg.init_std, dtype_of(cfg.param_dtype)
        self.dtype, self.cfg = dtype_of(cfg.dtype), cfg
        self.rope, self.local_rope = cfg.rope, cfg.local_rope
        self.scale = cfg.attention_scale or (Hn + Hr) ** -0.5
        self.dropout, self.softcap = cfg.attention_dropout, cfg.attn_logit_softcap
        if Rq:
            self.wq_a = normal_param(rngs, (D, Rq), ("embed", "q_lora"), std, param_dtype)
            self.q_norm = norm_for(cfg, Rq, axis="q_lora")
            self.wq_b = normal_param(rngs, (Rq, N, Hn + Hr), ("q_lora", "heads", "head_dim"), std, param_dtype)
            self.wq = None
        else:
            self.wq = normal_param(rngs, (D, N, Hn + Hr), ("embed", "heads", "head_dim"), std, param_dtype)
            self.wq_a = self.q_norm = self.wq_b = None
        self.wkv_a = normal_param(rngs, (D, R + Hr), ("embed", "kv_lora"), std, param_dtype)
        self.kv_norm = norm_for(cfg, R, axis="kv_lora")
        self.wkv_b = normal_param(rngs, (R, N, Hn + Hv), ("kv_lora", "heads", "head_dim"), std, param_dtype)
        self.wo = normal_param(rngs, (N, Hv, D), ("heads", "head_dim", "embed"), out_std, param_dtype)
        self.bo = const_param((D,), ("embed",), 0.0, param_dtype) if cfg.out_bias else None
        self.sinks = const_param((N,), ("heads",), 0.0, param_dtype) if cfg.attention_sinks else None

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        mask: jax.Array,
        cache: dict | None = None,
        cache_index: jax.Array | None = None,
        bias: jax.Array | None = None,
        dropout_keys: jax.Array | None = None,
        layer: jax.Array | None = None,
        local: jax.Array | bool = False,
    ) -> tuple[jax.Array, dict | None]:
        """As `jaxlm.nn.attention.Attention.__call__`; the cache's "k" holds latents (.., 1, R), "v" the RoPE
        keys (.., 1, Hr)."""
        cfg = self.cfg
        Hn, Hr, R = cfg.mla_nope_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        keys = fold_rows(dropout_keys, 1)  # LoRA dropout: a stream apart from the attention weights'
        if self.wq is not None:
            q = project(self, "wq", x, 1, keys)  # BTD,DNH->BTNH
        else:
            q = project(self, "wq_b", self.q_norm(project(self, "wq_a", x, 1, keys)), 1, keys)  # BTQ,QNH->BTNH
        kv_a = project(self, "wkv_a", x, 1, keys)  # BTD,DC->BTC
        latent, k_rope = self.kv_norm(kv_a[..., :R])[:, :, None], kv_a[..., R:][:, :, None]  # BT1R, BT1Hr
        inv_freq, scale = rope_tables(self.rope, self.local_rope, local, Hr, positions)
        q_rope = apply_rope(q[..., Hn:], positions, inv_freq, scale)
        k_rope = apply_rope(k_rope, positions, inv_freq, scale)
        if cache is not None:  # the latents and RoPE keys, each row at its own slots
            table, floor = cache["table"], cache.get("floor")
            new = {"k": latent, "v": k_rope}
            cache = {**cache, **{n: paged_write(cache[n], new[n], table, cache_index, layer, floor) for n in "kv"}}
            latent, k_rope = (paged_read(cache[n], table, layer).astype(self.dtype) for n in "kv")
        w_kv = self.wkv_b[...].astype(self.dtype)  # (R, N, Hn + Hv)
        kw = dict(
            whole_sequence=cache is None,
            mask=mask,
            bias=bias,
            scale=self.scale,
            dropout_rate=self.dropout,
            dropout_keys=dropout_keys,
            softcap=self.softcap,
            sinks=None if self.sinks is None else self.sinks[...],
            implementation=cfg.attention_impl,
            block_size=cfg.attention_block,
        )
        if cache is not None and x.shape[1] <= ABSORB_BELOW:  # absorbed: multi-query attention over the latents
            q_latent = jnp.einsum("BTNH,RNH->BTNR", q[..., :Hn], w_kv[..., :Hn])
            k_latent = jnp.concatenate([latent, k_rope], axis=-1)  # (B, S, 1, R + Hr)
            out = attend(jnp.concatenate([q_latent, q_rope], axis=-1), k_latent, latent, **kw)
            out = jnp.einsum("BTNR,RNH->BTNH", out, w_kv[..., Hn:])
        else:
            kv = dense(latent[:, :, 0], w_kv, 1)  # BSR,RNH->BSNH
            k_nope, v = kv[..., :Hn], kv[..., Hn:]
            N = kv.shape[2]
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_rope.shape[:2], N, Hr))], axis=-1)
            q = jnp.concatenate([q[..., :Hn], q_rope], axis=-1)
            out = attend(q, k, v, **kw)
        y = project(self, "wo", out, 2, keys)  # BTNH,NHD->BTD
        if self.bo is not None:
            y = y + self.bo[...].astype(self.dtype)
        return y, cache
