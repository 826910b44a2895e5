"""Per-row writes into a KV cache: every row has its own length, so new tokens land at each row's own slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array | int, layer: jax.Array | None = None) -> jax.Array:
    """buffer[b, index[b] + t] = new[b, t] for every row b and t < T; writes at slot S or past it are dropped.

    Args:
      buffer: (B, S, ...) cache, or (L, B, S, ...) with `layer` (one layer's slots are written in place).
      new: (B, T, ...) the new tokens' entries.
      index: (B,) int (or a scalar for all rows), the slot of each row's first new token.
      layer: int scalar (may be traced), or None.

    Returns:
      buffer with the new entries (same shape and dtype).
    """
    B, T = new.shape[:2]
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (B,))
    rows = jnp.arange(B)[:, None]
    cols = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # (B, T)
    where = (rows, cols) if layer is None else (layer, rows, cols)
    return buffer.at[where].set(new.astype(buffer.dtype), mode="drop")
