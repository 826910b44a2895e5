"""Attention masks and position biases: materialised (B, T, S), or described by positions for blockwise attention.

`attention_mask` builds the boolean (B, T, S) mask of every kind jaxlm supports. `MaskSpec` holds its inputs
instead, and `PositionBias` a bias as a function of positions (ALiBi, T5), so that blockwise attention
(`jaxlm.ops.blockwise`) builds each (query block, key block) tile when it needs it and memory stays linear in T.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# A window no sequence reaches: a global layer's window when a traced flag picks between global and local.
NO_WINDOW = 2**30


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    kv_valid: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    q_segments: jax.Array | None = None,
    kv_segments: jax.Array | None = None,
    q_prefix: jax.Array | None = None,
    kv_prefix: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask, True where query t may attend to key s.

    Args:
      q_positions: (B, T) int positions of the queries.
      kv_positions: (B, S) int positions of the keys.
      kv_valid: (B, S) bool, False for padding or empty cache slots.
      causal: keys after the query's position are masked.
      q_segments, kv_segments: (B, T), (B, S) int segment ids of packed examples: a query sees only keys
        of its own segment (attention never crosses examples).
      q_prefix, kv_prefix: (B, T), (B, S) bool, the prefix of a prefix LM (UniLM, GLM): with `causal`,
        prefix queries also see later prefix keys (bidirectional prefix, causal rest).
      sliding_window: if set, keys more than `sliding_window - 1` positions
        before the query are masked (the query sees `sliding_window` keys);
        without `causal`, also those as far after it (|q - k| < sliding_window).

    Returns:
      (B, T, S) bool.
    """
    q = q_positions[:, :, None]
    k = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
    if causal:
        allowed = k <= q
        if q_prefix is not None:
            allowed |= q_prefix[:, :, None] & kv_prefix[:, None, :]
        mask &= allowed
    if sliding_window is not None:
        mask &= (k > q - sliding_window) & (causal | (k < q + sliding_window))
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The inputs of `attention_mask`, unmaterialised: (B, T) query and (B, S) key arrays, not (B, T, S).

    window: None, or an int32 scalar (may be traced: a layer scan picks `NO_WINDOW` for global layers).
    """

    q_positions: jax.Array
    kv_positions: jax.Array
    kv_valid: jax.Array | None = None
    q_segments: jax.Array | None = None
    kv_segments: jax.Array | None = None
    q_prefix: jax.Array | None = None
    kv_prefix: jax.Array | None = None
    window: jax.Array | None = None
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """The (B, T, S) bool mask."""
        return self.tile(slice(None), slice(None))

    def tile(self, t: slice | jax.Array, s: slice | jax.Array) -> jax.Array:
        """The mask of queries `t` and keys `s` (slices, or index arrays along T and S): (B, t, s) bool."""
        qa = lambda a: None if a is None else a[:, t]  # noqa: E731
        ka = lambda a: None if a is None else a[:, s]  # noqa: E731
        return attention_mask(
            qa(self.q_positions),
            ka(self.kv_positions),
            kv_valid=ka(self.kv_valid),
            causal=self.causal,
            sliding_window=self.window,
            q_segments=qa(self.q_segments),
            kv_segments=ka(self.kv_segments),
            q_prefix=qa(self.q_prefix),
            kv_prefix=ka(self.kv_prefix),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PositionBias:
    """An additive attention bias that is a function of positions: fn(params, q_pos (B, T), kv_pos (B, S)) ->
    (b, n, T, S) with b in {1, B}, n in {1, N}. params (a pytree) may be learned (T5's table): blockwise
    attention differentiates each tile's bias with respect to them."""

    params: Any
    fn: Callable = dataclasses.field(metadata=dict(static=True))

    def __call__(self, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
        return self.fn(self.params, q_pos, kv_pos)
