"""Language-model losses, and per-token statistics of the read-out computed a chunk of positions at a time.

`chunked_readout` never holds the (B, T, V) logits: each chunk's logits are made, reduced to per-token values
and dropped, and the backward pass makes them again chunk by chunk (as MaxText's vocabulary tiling and TRL's
fused LM-head loss do), so the loss's memory is B·chunk·V instead of B·T·V.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0) -> jax.Array:
    """-log p(target) of each position, plus z_loss * log(Z)^2: (B, T, V), (B, T) ids -> (B, T) float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll + z_loss * jnp.square(log_z) if z_loss else nll


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy over the unmasked tokens, and their count.

    Returning (sum, count) rather than a mean lets callers average correctly
    across micro-batches, devices and hosts.

    Args:
      logits: (B, T, V), any float dtype; computed in float32.
      targets: (B, T) int token ids.
      mask: (B, T) bool/0-1, 1 = counts. None counts every token.
      z_loss: weight of the PaLM auxiliary loss z_loss * log(Z)^2, which keeps
        the softmax normaliser near 1 (Chowdhery et al. 2022).

    Returns:
      (loss_sum, token_count), float32 scalars.
    """
    return masked_sum(token_nll(logits, targets, z_loss=z_loss), mask)


def masked_sum(per_token: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(sum of per_token (B, T) where mask, count of mask); None counts every token."""
    mask = jnp.ones_like(per_token) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(mask)


def masked_positions(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Each row's first `size` positions where mask (B, T) is set: indices (B, size) int32, and which of them
    are set (B, size) bool (a row with fewer is padded with position 0, unset)."""
    mask = mask != 0
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=0)[0])(mask).astype(jnp.int32)
    return idx, jnp.arange(size) < jnp.sum(mask, axis=1, keepdims=True)


def masked_readout_sum(readout: Callable, x: jax.Array, targets: jax.Array, mask: jax.Array | None, *, fraction=4):
    """`masked_sum(readout(x, targets), mask)`, reading out only the masked positions when every row has at
    most T / `fraction` of them (SFT scores the responses: about 8% of the positions of the embedded instruction
    set): each row's masked positions are gathered into T / fraction slots, so the read-out (the (., V) logits
    and their gradient, the largest matmul of a small model) does a quarter of the work. A batch with a fuller
    row reads out every position, in the backward pass again (`jax.checkpoint`: that path keeps no logits).

    readout: (x (B, t, D), targets (B, t)) -> per-token losses (B, t) float32."""
    B, T = targets.shape
    size = -(-T // fraction)

    def every():
        return masked_sum(readout(x, targets), mask)

    if mask is None or size >= T:
        return every()

    def gathered():
        idx, valid = masked_positions(mask, size)
        take = lambda a: jnp.take_along_axis(a, idx.reshape(B, size, *[1] * (a.ndim - 2)), axis=1)  # noqa: E731
        return masked_sum(readout(take(x), take(targets)), take(mask.astype(jnp.float32)) * valid)

    fits = jnp.max(jnp.sum(mask != 0, axis=1)) <= size
    return jax.lax.cond(fits, gathered, jax.checkpoint(every))


def chunked_readout(fn: Callable, head: Callable, x: jax.Array, *per_token: jax.Array, chunk: int):
    """fn(head(x), *per_token) computed `chunk` positions at a time, the logits of one chunk alive at once.

    Args:
      fn: (logits (B, c, V), *per_token (B, c)) -> an array or tuple of arrays (B, c) (log-probs, losses).
      head: final hidden states (B, c, D) -> logits (B, c, V).
      x: (B, T, D) final hidden states.
      per_token: (B, T) arrays aligned with x (targets).
      chunk: positions a chunk (every row of the batch at once); >= T: one chunk, no loop. T is padded to a
        multiple of it (the padding's outputs are dropped).

    Returns:
      fn's outputs over the whole sequence, (B, T) each. Gradients flow to x and to what head closes over
      (its weights); the backward pass recomputes each chunk's logits.
    """
    B, T = x.shape[:2]
    if chunk < 1:
        raise ValueError(f"the read-out chunk must be >= 1 positions, got {chunk}")
    if chunk >= T:
        return fn(head(x), *per_token)
    n = -(-T // chunk)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    split = lambda a: jnp.moveaxis(pad(a).reshape(B, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint  # keep each chunk's inputs only: its logits are made again in the backward pass
    def one(xs):
        return fn(head(xs[0]), *xs[1:])

    outs = jax.lax.map(one, (split(x), *map(split, per_token)))
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(B, n * chunk, *o.shape[3:])[:, :T], outs)
