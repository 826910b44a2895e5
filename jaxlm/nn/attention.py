"""Multi-head self- and cross-attention (MHA / MQA / GQA) with rotary positions, optional q/k norms and a KV cache.

Projections are stored per head: q (D, N, H), k and v (D, K, H), o (N, H, D), so
tensor parallelism can split `heads` / `kv_heads` without reshapes.

The KV cache is a pool of blocks (`jaxlm.ops.cache`): {"k", "v": (NB, Z, K, H), "table": (B, nb)}, the
table listing each row's blocks, laid out by the model (`TransformerLM.init_cache`, stacked over layers) and
updated here; the model passes it in and gets the updated one back, so decoding stays a pure jit-compiled
function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import active_mesh, context_size
from jaxlm.nn.adapters import project, projects
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import const_param, normal_param
from jaxlm.ops.attention import MaskSpec, dot_product_attention
from jaxlm.ops.cache import paged_read, paged_write
from jaxlm.ops.dropout import fold_rows
from jaxlm.ops.paged_attention import paged_attention
from jaxlm.ops.positions import apply_rope, scaled_rope_frequencies
from jaxlm.parallel.context import ring_attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, whole_sequence: bool, **kwargs) -> jax.Array:
    """`dot_product_attention(q, k, v, **kwargs)`, or ring attention (`jaxlm.parallel.context`) when the active
    mesh splits the sequence. whole_sequence: self-attention of a whole sequence (no cache): what the ring
    splits."""
    if whole_sequence and context_size() > 1:
        if not isinstance(kwargs.get("mask"), MaskSpec):
            raise ValueError("context parallelism needs the mask as a MaskSpec (model.attention_impl=blockwise)")
        if kwargs.get("dropout_keys") is not None and kwargs.get("dropout_rate"):
            raise ValueError("attention dropout does not run under context parallelism (ring attention)")
        keep = ("mask", "bias", "scale", "softcap", "sinks", "block_size")
        return ring_attention(q, k, v, mesh=active_mesh(), **{n: kwargs[n] for n in keep if n in kwargs})
    return dot_product_attention(q, k, v, **kwargs)


def rope_tables(rope: dict, local_rope: dict | None, local, head_dim: int, positions: jax.Array):
    """(inverse frequencies, cos/sin scale) of a layer: `rope`, or `local_rope` where `local` (may be traced)."""

    def frequencies(rope):  # dynamic NTK and LongRoPE depend on the longest position in use (as in HF)
        seq_len = jnp.max(positions) + 1 if rope["scaling"] in ("dynamic", "longrope") else None
        return scaled_rope_frequencies(head_dim, **rope, seq_len=seq_len)

    inv_freq, scale = frequencies(rope)
    if local_rope is not None:
        local_freq, local_scale = frequencies(local_rope)
        inv_freq, scale = jnp.where(local, local_freq, inv_freq), jnp.where(local, local_scale, scale)
    return inv_freq, scale


class Attention(nnx.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        out_bias: bool,
        rope: dict | None,
        local_rope: dict | None = None,
        qk_norm: dict | None = None,
        softcap: float = 0.0,
        sinks: bool = False,
        implementation: str,
        block_size: int = 512,
        scale: float | None = None,
        dropout: float = 0.0,
        std: float,
        out_std: float,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        """rope / local_rope: `ModelConfig.rope` of global and sliding-window layers (local_rope None: the same).
        qk_norm: keyword arguments of `Norm` for RMSNorms over head_dim of q and k (before RoPE), or None.
        softcap: > 0 soft-caps the attention scores. sinks: a learned sink logit per head (gpt-oss)."""
        N, K, H = num_heads, num_kv_heads, head_dim
        self.num_kv_heads, self.head_dim = K, H
        self.rope, self.local_rope, self.softcap = rope, local_rope, softcap
        self.implementation, self.block_size, self.dtype, self.scale = implementation, block_size, dtype, scale
        self.q_norm = Norm(H, **qk_norm, axis="head_dim") if qk_norm else None
        self.k_norm = Norm(H, **qk_norm, axis="head_dim") if qk_norm else None
        self.dropout = dropout  # on the attention weights, when row keys are passed
        self.wq = normal_param(rngs, (dim, N, H), ("embed", "heads", "head_dim"), std, param_dtype)
        self.wk = normal_param(rngs, (dim, K, H), ("embed", "kv_heads", "head_dim"), std, param_dtype)
        self.wv = normal_param(rngs, (dim, K, H), ("embed", "kv_heads", "head_dim"), std, param_dtype)
        self.wo = normal_param(rngs, (N, H, dim), ("heads", "head_dim", "embed"), out_std, param_dtype)
        if qkv_bias:
            self.bq = const_param((N, H), ("heads", "head_dim"), 0.0, param_dtype)
            self.bk = const_param((K, H), ("kv_heads", "head_dim"), 0.0, param_dtype)
            self.bv = const_param((K, H), ("kv_heads", "head_dim"), 0.0, param_dtype)
        else:
            self.bq = self.bk = self.bv = None
        self.bo = const_param((dim,), ("embed",), 0.0, param_dtype) if out_bias else None
        self.sinks = const_param((N,), ("heads",), 0.0, param_dtype) if sinks else None

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
        """Self-attention over x, or over the cache after writing x's keys into it.

        Args:
          x: (B, T, D).
          positions: (B, T) int, for RoPE.
          mask: (B, T, S) bool; S = T without cache, S = nb * Z (the slots of the rows' blocks) with it.
          cache: {"k", "v"}: (NB, Z, K, H) blocks, "table": (B, nb) each row's blocks; or None.
          cache_index: (B,) int (or a scalar for all rows), the logical slot of each row's first token.
          bias: additive (B, N, T, S) attention bias (ALiBi), or None.
          dropout_keys: (B, 2) row keys for attention-weight dropout (training), or None.
          layer: with it, `cache` holds every layer, {"k", "v"}: (L, NB, Z, K, H), and this layer's slots
            are written in place and its rows' blocks read (no copy of the layer's whole cache).
          local: bool scalar (may be traced): a sliding-window layer, which rotates with `local_rope`.

        Returns:
          (B, T, D) and the updated cache (None without cache).
        """
        c = lambda p: p[...].astype(self.dtype)  # noqa: E731
        keys = fold_rows(dropout_keys, 1)  # LoRA dropout: a stream apart from the attention weights'
        q, k, v = projects(self, ("wq", "wk", "wv"), x, 1, keys)  # BTD,DNH->BTNH; BTD,DKH->BTKH
        if self.bq is not None:
            q, k, v = q + c(self.bq), k + c(self.bk), v + c(self.bv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            inv_freq, scale = rope_tables(self.rope, self.local_rope, local, self.head_dim, positions)
            q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
        if cache is not None:  # each row writes at its own slots and reads its own blocks, nothing else
            table = cache["table"]
            cache = {
                **cache,
                **{
                    n: paged_write(cache[n], a, table, cache_index, layer, cache.get("floor"))
                    for n, a in (("k", k), ("v", v))
                },
            }
            if self._in_place(mask, bias, dropout_keys):  # no gathered copy of the rows' blocks
                if isinstance(mask, MaskSpec):
                    mask = mask.dense()
                out = paged_attention(
                    q, cache["k"], cache["v"], table, mask, layer, scale=self.scale, softcap=self.softcap
                )
                return self._project_out(out, dropout_keys), cache
            k, v = (paged_read(cache[n], table, layer).astype(self.dtype) for n in "kv")
        return self._attend(q, k, v, mask, bias, dropout_keys, whole_sequence=cache is None), cache

    def _in_place(self, mask, bias, dropout_keys) -> bool:
        """Whether a cached step's attention can read the pool in place (`paged_attention`): no bias, sinks or
        dropout, and the reference math (blockwise takes it too for a few queries)."""
        dropping = dropout_keys is not None and self.dropout > 0.0
        plain = bias is None and self.sinks is None and not dropping
        return plain and self.implementation in ("reference", "blockwise") and mask is not None

    def memory_kv(self, memory: jax.Array) -> dict:
        """Cross-attention keys and values of encoder states (B, S, D): {"k", "v"}: (B, S, K, H), computed once."""
        c = lambda p: p[...].astype(self.dtype)  # noqa: E731
        k, v = projects(self, ("wk", "wv"), memory)  # BSD,DKH->BSKH
        if self.bk is not None:
            k, v = k + c(self.bk), v + c(self.bv)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return {"k": k, "v": v}

    def cross(self, x: jax.Array, kv: dict, mask: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        """Cross-attention of x (B, T, D) to `memory_kv` output; mask (B, T, S); dropout_keys as in `__call__`."""
        q = project(self, "wq", x, 1, fold_rows(dropout_keys, 1))  # BTD,DNH->BTNH
        if self.bq is not None:
            q = q + self.bq[...].astype(self.dtype)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return self._attend(q, kv["k"].astype(self.dtype), kv["v"].astype(self.dtype), mask, None, dropout_keys)

    def _attend(self, q, k, v, mask, bias, dropout_keys, whole_sequence=False):
        out = attend(
            q,
            k,
            v,
            whole_sequence=whole_sequence,
            mask=mask,
            bias=bias,
            scale=self.scale,
            implementation=self.implementation,
            block_size=self.block_size,
            dropout_rate=self.dropout,
            dropout_keys=dropout_keys,
            softcap=self.softcap,
            sinks=None if self.sinks is None else self.sinks[...],
        )
        return self._project_out(out, dropout_keys)

    def _project_out(self, out, dropout_keys):
        y = project(self, "wo", out, 2, fold_rows(dropout_keys, 1))  # BTNH,NHD->BTD
        if self.bo is not None:
            y = y + self.bo[...].astype(self.dtype)
        return y
