"""Position encodings as pure functions.

- Rotary position embedding (RoPE), Su et al. 2021, "RoFormer", in the
  half-split layout of LLaMA / Hugging Face (`rotate_half`).
- Sinusoidal absolute positions, Vaswani et al. 2017, "Attention Is All You Need".
Learned absolute positions are a table lookup and live in `jaxlm.nn.embed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Inverse frequencies theta^(-2i/H), i < H/2. Returns (H/2,) float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * inv_freq[i].

    Args:
      x: (B, T, N, H) queries or keys.
      positions: (B, T) int or float positions.
      inv_freq: (H/2,) from `rope_frequencies` (or a scaled variant).

    Returns:
      (B, T, N, H) in x's dtype; the angles are computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal_positions(positions: jax.Array, dim: int, max_timescale: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [sin(p·w_i), cos(p·w_i)], w_i = max_timescale^(-2i/D).

    Args:
      positions: (B, T) positions.
      dim: D, even.

    Returns:
      (B, T, D) float32.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    inv = 1.0 / max_timescale ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
