"""Language-model losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if z_loss:
        nll = nll + z_loss * jnp.square(log_z)
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)
