"""Scaled dot-product attention for MHA, MQA and GQA.

Shapes use the letters of STYLE.md: B batch, T query length, S key length,
N query heads, K key/value heads, G = N // K query groups, H head dim.

GQA groups the query heads over the shared K/V heads ('BTKGH,BSKH->BKGTS')
instead of repeating K and V in memory. MHA is K = N, MQA is K = 1.

Masks and biases come materialised ((B, T, S) arrays), or described by positions (`MaskSpec`,
`PositionBias`): the blockwise implementation (`jaxlm.ops.blockwise`) needs the latter, the others build the
arrays from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.choices import ATTENTION_IMPLS
from jaxlm.ops.blockwise import blockwise_attention
from jaxlm.ops.dropout import dropout
from jaxlm.ops.masks import MaskSpec, PositionBias, attention_mask

__all__ = ["MaskSpec", "PositionBias", "attention_mask", "dot_product_attention"]

# Decoding steps (a few queries) take the reference path whatever the implementation: one tile, no blocks.
BLOCKWISE_ABOVE = 8


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | MaskSpec | None = None,
    bias: jax.Array | PositionBias | None = None,
    scale: float | None = None,
    implementation: str = "reference",
    dropout_rate: float = 0.0,
    dropout_keys: jax.Array | None = None,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
    block_size: int = 512,
) -> jax.Array:
    """dropout(softmax(cap(q·k^T * scale) + bias, masked)) · v, cap(s) = softcap · tanh(s / softcap).

    Args:
      q: (B, T, N, H) queries.
      k: (B, S, K, H) keys, N % K == 0.
      v: (B, S, K, Hv) values (Hv may differ from H: multi-head latent attention).
      mask: bool, broadcastable to (B, T, S) (or (B, N, T, S)); True = attend. Or a `MaskSpec` (blockwise).
      bias: float additive bias broadcastable to (B, N, T, S) (T5 bias, ALiBi), or a `PositionBias`.
      scale: defaults to 1/sqrt(H).
      implementation: "reference" (the einsum below, softmax in fp32), or
        "xla" / "cudnn" to call `jax.nn.dot_product_attention` (cuDNN is the
        fused flash-attention kernel on NVIDIA GPUs, bf16/fp16 only), or "blockwise" (`blockwise_attention`:
        memory linear in T; needs the mask as a `MaskSpec`; T <= 8 queries take the reference path).
      dropout_rate: attention-weight dropout (training; reference implementation only).
      dropout_keys: (B, 2) row keys (`jaxlm.ops.dropout`), or None for no dropout.
      softcap: > 0 bounds the scores to (-softcap, softcap) (Gemma 2; reference implementation only).
      sinks: (N,) logits, one a head, that join each query's softmax as a key with no value: the weights sum
        to less than 1 (gpt-oss's attention sinks; reference or blockwise). None: none.
      block_size: blockwise tiles (queries and keys).

    Returns:
      (B, T, N, Hv) in q's dtype. Rows whose keys are all masked return the
      mean of v instead of NaN (they only occur for padding queries).
    """
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLS}")
    scale = H**-0.5 if scale is None else scale
    dropping = dropout_keys is not None and dropout_rate > 0.0
    if implementation == "blockwise" and T > BLOCKWISE_ABOVE:
        if dropping:
            raise ValueError("attention dropout needs the reference implementation, not 'blockwise'")
        if mask is None:
            zeros = jnp.zeros((B, 1), jnp.int32)
            mask = MaskSpec(q_positions=zeros, kv_positions=zeros, causal=False)
        if not isinstance(mask, MaskSpec) or (bias is not None and not isinstance(bias, PositionBias)):
            raise ValueError("blockwise attention takes its mask as a MaskSpec and its bias as a PositionBias")
        return blockwise_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=scale,
            softcap=softcap,
            sinks=sinks,
            block_q=block_size,
            block_k=block_size,
        )
    if isinstance(bias, PositionBias):
        if not isinstance(mask, MaskSpec):
            raise ValueError("a PositionBias needs the mask as a MaskSpec (it reads the positions there)")
        bias = bias(mask.q_positions, mask.kv_positions)
    if isinstance(mask, MaskSpec):
        mask = mask.dense()
    if mask is not None and mask.ndim == 3:
        mask = mask[:, None]  # (B, 1, T, S)

    if implementation not in ("reference", "blockwise"):
        if softcap:
            raise ValueError(f"attention soft-capping needs the reference implementation, not {implementation!r}")
        if dropping:
            raise ValueError(f"attention dropout needs the reference implementation, not {implementation!r}")
        if sinks is not None:
            raise ValueError(f"attention sinks need the reference implementation, not {implementation!r}")
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)

    G = N // K
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, H)
    # Training and prefill (T > 8): batch dims (B, K) first and the contracted dim last on both sides, so
    # XLA's CPU GEMMs read every operand contiguously, and the G query heads of a kv head folded into one
    # GEMM of M = G*T rows, with the mask and bias laid out as the scores (B, K, M, S): a broadcast over a
    # 5-d view of the scores doubled the forward time on XLA's CPU (llama_tiny: 25 -> 14 ms a layer forward).
    # Decoding (a few queries against a long cache) contracts in place: transposing the cache would copy it.
    if T > 8:
        qg = qg.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = jnp.einsum("BKMH,BKSH->BKMS", qg, k, preferred_element_type=jnp.float32)
        layout = lambda x: _folded(x, K, G, T)  # noqa: E731
    else:
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
        layout = lambda x: x.reshape(*_grouped(x.shape, K, G))  # noqa: E731
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + layout(bias.astype(jnp.float32))
    if mask is not None:
        scores = jnp.where(layout(mask), scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # the sink as one more key: its column joins the normalisation, then is dropped
        sink = layout(jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, N, 1, 1), (B, N, 1, 1)))
        sink = jnp.broadcast_to(sink, (*scores.shape[:-1], 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    probs = dropout(probs.astype(v.dtype), dropout_rate, dropout_keys)
    if T > 8:
        out = jnp.einsum("BKMS,BKSH->BKMH", probs, v)
        return out.reshape(B, K, G, T, -1).transpose(0, 3, 1, 2, 4).reshape(B, T, N, -1)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, -1)


def _folded(x: jax.Array, K: int, G: int, T: int) -> jax.Array:
    """(b, n, t, s) mask or bias, n in {1, N}, t in {1, T} -> (b, k, G*T, s) as the folded scores BKMS."""
    x = x.reshape(*_grouped(x.shape, K, G))
    b, k, _, _, s = x.shape
    return jnp.broadcast_to(x, (b, k, G, T, s)).reshape(b, k, G * T, s)


def _grouped(shape: tuple[int, ...], K: int, G: int) -> tuple[int, ...]:
    """(b, n, t, s) with n in {1, N} -> (b, k, g, t, s) broadcastable to BKGTS."""
    if len(shape) != 4:
        raise ValueError(f"mask/bias must have 3 or 4 dims, got shape {shape}")
    b, n, t, s = shape
    if n == 1:
        return (b, 1, 1, t, s)
    if n != K * G:
        raise ValueError(f"mask/bias head dim {n} is neither 1 nor {K * G}")
    return (b, K, G, t, s)
