"""Dropout with one PRNG key per batch row.

A row's mask depends only on its own key, never on which other rows share the
computation, so micro-batching (gradient accumulation, pipeline stages) and
sharding over devices leave the masks, and so the training run, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per row: (2,) uint32 key -> (B, 2)."""
    return jax.random.split(key, batch)


def fold_rows(keys: jax.Array | None, data) -> jax.Array | None:
    """Every row key folded with the same `data` (an int, may be traced): (B, 2) -> (B, 2). None stays None."""
    if keys is None:
        return None
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, jnp.asarray(data, jnp.uint32))


def dropout(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1 / (1 - rate).

    Args:
      x: (B, ...) activations (or attention weights).
      rate: drop probability in [0, 1).
      keys: (B, 2) uint32 row keys, or None for the identity (evaluation, decoding).

    Returns:
      x's shape and dtype.
    """
    if keys is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if keys.shape[0] != x.shape[0]:
        raise ValueError(f"dropout needs one key per row: keys {keys.shape} for x {x.shape}")
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
