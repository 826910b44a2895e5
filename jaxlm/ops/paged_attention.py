"""Decode-time attention over a paged KV cache (`jaxlm.ops.cache`), reading each row's blocks where they lie.

With XLA ops, attention over a paged cache first gathers a row's blocks into a (B, nb * Z, K, H) copy, then
runs the reference einsums. On CPU both cost far more than the bytes they touch: at 16 rows of a 30-layer
model, a decode step spent more time there than in its weight matmuls. On CPU with the native kernels
(`jaxlm.kernels`) this is one custom call that reads every cached key and value once, in place; elsewhere
(GPUs, no compiler, `JAXLM_KERNELS=0`) it is the gather and the reference attention. Both give the same
values (to float rounding), except that a query that sees no slot gets zeros from the kernel and the mean of
the gathered values from the reference (only padding queries do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import kernels
from jaxlm.ops.attention import dot_product_attention
from jaxlm.ops.cache import paged_read

KERNEL_MAX_QUERIES = 8  # decode and speculative steps; prefill chunks take XLA's GEMMs


def paged_attention(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    table: jax.Array,
    mask: jax.Array,
    layer: jax.Array | int | None = None,
    *,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """softmax(cap(q·k^T * scale), masked) · v over each row's cached slots.

    Args:
      q: (B, T, N, H) queries; head n reads kv head n // (N // K).
      k_pool: (NB, Z, K, H) blocks of Z slots, or (L, NB, Z, K, H) with `layer`.
      v_pool: (NB, Z, K, Hv), or (L, NB, Z, K, Hv).
      table: (B, nb) int, each row's blocks in order; an entry outside [0, NB) is no block.
      mask: (B, T, nb * Z) bool, True = attend (row b's slot s is slot s % Z of block table[b, s // Z]).
      layer: int scalar (may be traced) with stacked pools, else None.
      scale: defaults to 1/sqrt(H).
      softcap: > 0 bounds the scores to (-softcap, softcap) (Gemma 2).

    Returns:
      (B, T, N, Hv) in q's dtype.
    """
    B, T, N, H = q.shape
    scale = H**-0.5 if scale is None else scale
    if layer is None:
        k_pool, v_pool, layer = k_pool[None], v_pool[None], 0

    def xla(q):
        k, v = (paged_read(p, table, layer).astype(q.dtype) for p in (k_pool, v_pool))
        return dot_product_attention(q, k, v, mask=mask, scale=scale, softcap=softcap)

    def kernel(q):
        out = jax.ShapeDtypeStruct((B, T, N, v_pool.shape[-1]), jnp.float32)
        call = jax.ffi.ffi_call("jaxlm_paged_attention", out, vmap_method="sequential")
        at = jnp.asarray(layer, jnp.int32)
        y = call(q.astype(jnp.float32), k_pool, v_pool, table.astype(jnp.int32), mask.astype(bool), at,
                 scale=np.float32(scale), softcap=np.float32(softcap))  # fmt: skip
        return y.astype(q.dtype)

    f32 = k_pool.dtype == v_pool.dtype == jnp.float32
    if T > KERNEL_MAX_QUERIES or not f32:
        return xla(q)
    return kernels.cpu_or(kernel, xla, q)
