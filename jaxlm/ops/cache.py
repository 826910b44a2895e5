"""The KV cache as a pool of fixed-size blocks: each row's slots live in the blocks its block table lists
(as in vLLM's paged attention), so a step reads and writes only the blocks a row holds, and memory grows
with the tokens in use rather than with rows x max_seq_len.

A row's logical slot s is physical slot s % Z of block table[b, s // Z]. A contiguous cache of B rows of S
slots is the special case Z = S, table[b] = [b].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """buffer[b, index[b] + t] = new[b, t] for every row b and t < T; writes at slot S or past it are dropped.

    Args:
      buffer: (B, S, ...) per-row slots.
      new: (B, T, ...) the new tokens' entries.
      index: (B,) int (or a scalar for all rows), the slot of each row's first new token.

    Returns:
      buffer with the new entries (same shape and dtype).
    """
    B, T = new.shape[:2]
    cols = _slots(index, B, T)
    return buffer.at[jnp.arange(B)[:, None], cols].set(new.astype(buffer.dtype), mode="drop")


def paged_write(
    pool: jax.Array,
    new: jax.Array,
    table: jax.Array,
    index: jax.Array | int,
    layer: jax.Array | None = None,
    floor: jax.Array | None = None,
) -> jax.Array:
    """Row b's new entries at its logical slots index[b] + t, through its block table; slots past the table
    (or table entries past the pool: unallocated) are dropped.

    Args:
      pool: (NB, Z, ...) blocks of Z slots, or (L, NB, Z, ...) with `layer` (that layer's blocks, in place).
      new: (B, T, ...).
      table: (B, nb) int, the blocks of each row in order; an entry >= NB is no block.
      index: (B,) int (or a scalar), the logical slot of each row's first new token.
      layer: int scalar (may be traced), or None.
      floor: (B,) int, or None: row b's slots below floor[b] are read-only (blocks it shares with other rows,
        `jaxlm.engine.prefix`): writes there are dropped.

    Returns:
      pool with the new entries (same shape and dtype).
    """
    B, T = new.shape[:2]
    axis = 0 if layer is None else 1
    NB, Z = pool.shape[axis], pool.shape[axis + 1]
    slots = _slots(index, B, T)  # (B, T)
    if floor is not None:
        slots = jnp.where(slots >= floor[:, None], slots, table.shape[1] * Z)  # past the table: dropped
    blocks = jnp.take_along_axis(table, slots // Z, axis=1, mode="fill", fill_value=NB)
    where = (blocks, slots % Z) if layer is None else (layer, blocks, slots % Z)
    return pool.at[where].set(new.astype(pool.dtype), mode="drop")


def paged_read(pool: jax.Array, table: jax.Array, layer: jax.Array | None = None, fill=0) -> jax.Array:
    """The rows' logical slots in order: (B, nb * Z, ...) from pool (NB, Z, ...) (or (L, NB, Z, ...) at
    `layer`) and table (B, nb); slots of table entries >= NB read `fill`. Moves only the listed blocks."""
    B, nb = table.shape
    at = table if layer is None else (layer, table)
    blocks = pool.at[at].get(mode="fill", fill_value=fill)  # (B, nb, Z, ...)
    return blocks.reshape(B, nb * blocks.shape[2], *blocks.shape[3:])


def contiguous_table(batch: int) -> jax.Array:
    """(B, 1) table of a contiguous cache: row b is block b."""
    return jnp.arange(batch, dtype=jnp.int32)[:, None]


def _slots(index, B: int, T: int) -> jax.Array:
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (B,))
    return index[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # (B, T)
