"""Normalisation layers as pure functions over the last (D) axis.

Statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float = 1e-6, offset: float = 0.0) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * (offset + scale) (Zhang & Sennrich 2019; Gemma: offset 1). x: (..., D), scale: (D,)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, *, eps: float = 1e-5) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias (Ba et al. 2016). x: (..., D)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
