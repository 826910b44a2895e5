"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept a draft's tokens so that the output
keeps the target's distribution exactly.

Shapes: B rows, K draft tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.sampling import categorical


def speculative_accept(
    key: jax.Array, drafts: jax.Array, q: jax.Array, p: jax.Array, limit: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """How many draft tokens each row keeps, and the token that follows them.

    Draft token j is kept with probability min(1, p_j(d_j) / q_j(d_j)) while all before it were kept; after
    the first rejection the next token is drawn from max(0, p_a - q_a) (renormalized), and after K kept
    tokens from p_K, so every emitted token follows the target's distribution p. Greedy rows (one-hot p and
    q) keep exactly the drafts the target's argmax agrees with.

    Args:
      key: PRNG key, or (B, 2) one key per row.
      drafts: (B, K) int, the drafted tokens.
      q: (B, K, V) the draft's distribution at each drafted token (one-hot for a deterministic draft).
      p: (B, K + 1, V) the target's distribution after each prefix: p[:, j] predicts the token after j drafts.
      limit: (B,) int in [0, K], drafts that may be kept (the rest are treated as not proposed).

    Returns:
      kept (B,) int in [0, limit], and next (B,) int32: the tokens emitted are drafts[:, :kept] then next.
    """
    B, K = drafts.shape
    keys = jax.random.split(key, B) if key.ndim == 1 else key
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (K,)))(keys)
    pick = lambda dist: jnp.take_along_axis(dist, drafts[..., None], axis=-1)[..., 0]  # noqa: E731
    ok = (u * pick(q) < pick(p[:, :K])) & (jnp.arange(K)[None] < limit[:, None])
    kept = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    p_next = jnp.take_along_axis(p, kept[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q, jnp.minimum(kept, K - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    total = residual.sum(-1, keepdims=True)
    rejected = (kept < limit)[:, None] & (total > 0)
    dist = jnp.where(rejected, residual / jnp.where(total > 0, total, 1.0), p_next)
    draw = categorical(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), jnp.log(dist))
    return kept, draw
