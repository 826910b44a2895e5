"""Position encodings as pure functions.

- Rotary position embedding (RoPE), Su et al. 2021, "RoFormer", in the
  half-split layout of LLaMA / Hugging Face (`rotate_half`), and its
  length-scaling variants under Hugging Face's `rope_scaling` names:
  `linear` (position interpolation, Chen et al. 2023), `dynamic` (dynamic NTK,
  bloc97/emozilla 2023), `yarn` (Peng et al. 2023), `llama3` (Meta's LLaMA 3.1
  scheme). They follow `transformers/modeling_rope_utils.py`.
- Sinusoidal absolute positions, Vaswani et al. 2017, "Attention Is All You Need".
- ALiBi, Press et al. 2022, "Train Short, Test Long": a per-head linear bias.
- T5 relative position buckets and bias, Raffel et al. 2020 (`T5Attention`).
Learned absolute positions are a table lookup and live in `jaxlm.nn.embed`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.choices import ROPE_SCALINGS


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Inverse frequencies theta^(-2i/H), i < H/2. Returns (H/2,) float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def scaled_rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: str = "none",
    *,
    factor: float = 1.0,
    original_max_len: int = 0,
    seq_len: jax.Array | int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float = 0.0,
    truncate: bool = True,
    short_factor: tuple[float, ...] = (),
    long_factor: tuple[float, ...] = (),
) -> tuple[jax.Array, float]:
    """RoPE inverse frequencies under a length-scaling scheme, and the cos/sin scale.

    Args:
      head_dim, theta: as for `rope_frequencies`.
      scaling: "none" | "linear" | "dynamic" | "yarn" | "llama3".
      factor: context extension factor.
      original_max_len: context length of pre-training (Hugging Face's
        `original_max_position_embeddings`; for "dynamic", `max_position_embeddings`).
      seq_len: "dynamic" and "longrope": current length (max position + 1; may be traced).
      low_freq_factor, high_freq_factor: "llama3" only.
      beta_fast, beta_slow, attention_factor: "yarn" (and attention_factor "longrope"); 0 = derived from factor.
      truncate: "yarn": round the correction range to whole dimensions (False: gpt-oss).
      short_factor, long_factor: "longrope" (Phi-3): (H/2,) divisors of the frequencies, the long ones once
        seq_len exceeds original_max_len.

    Returns:
      ((H/2,) float32 inverse frequencies, scale for cos and sin: 1 except for YaRN).
    """
    inv = rope_frequencies(head_dim, theta)
    if scaling == "none":
        return inv, 1.0
    if scaling == "linear":
        return inv / factor, 1.0
    if scaling == "dynamic":
        length = jnp.maximum(jnp.asarray(seq_len if seq_len is not None else original_max_len), original_max_len)
        base = theta * ((factor * length / original_max_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
        exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        return 1.0 / (base**exponents), 1.0
    if scaling == "llama3":
        low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled), 1.0
    if scaling == "yarn":

        def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in the context
            return head_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (high frequencies); 0: interpolate it
        inv = inv / factor * (1 - extrapolate) + inv * extrapolate
        scale = attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv, scale
    if scaling == "longrope":
        length = jnp.asarray(seq_len if seq_len is not None else original_max_len)
        divisors = jnp.where(
            length > original_max_len, jnp.asarray(long_factor, jnp.float32), jnp.asarray(short_factor, jnp.float32)
        )
        if not attention_factor:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original_max_len)) if factor > 1 else 1.0
        return inv / divisors, attention_factor
    raise ValueError(f"unknown RoPE scaling {scaling!r}; expected one of {ROPE_SCALINGS}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * inv_freq[i].

    Args:
      x: (B, T, N, H) queries or keys.
      positions: (B, T) int or float positions.
      inv_freq: (H/2,) from `rope_frequencies` or `scaled_rope_frequencies`.
      scale: multiplies cos and sin (YaRN's attention factor).

    Returns:
      (B, T, N, H) in x's dtype; the angles are computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    sin = scale * jnp.sin(angles)[:, :, None, :]
    cos = scale * jnp.cos(angles)[:, :, None, :]
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


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi head slopes: the geometric sequence 2^(-8/n), n the next-lower power of two heads,
    interleaved with the sequence for 2n when num_heads is not a power of two (Press et al.). (N,)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra = 2.0 ** (-4.0 / closest)  # 2^(-8/(2 closest)): its odd powers fill in
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(slopes: jax.Array, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
    """-slope * |query position - key position| as an additive attention bias.

    Args:
      slopes: (N,) from `alibi_slopes`.
      q_pos: (B, T), kv_pos: (B, S) int positions.

    Returns:
      (B, N, T, S) float32. For causal attention this is the paper's slope * (k - q).
    """
    distance = jnp.abs(q_pos[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)  # (B, T, S)
    return -slopes[None, :, None, None] * distance[:, None]


def t5_position_buckets(relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucket of each relative position (key - query): exact for small distances, log-spaced up to
    `max_distance`, shared beyond it; bidirectional uses half the buckets per direction. int32, same shape."""
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(relative.dtype) * num_buckets
        relative = jnp.abs(relative)
    else:
        relative = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    log_ratio = jnp.log(jnp.maximum(relative, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return (buckets + jnp.where(is_small, relative, large)).astype(jnp.int32)


def t5_bias(
    table: jax.Array, q_pos: jax.Array, kv_pos: jax.Array, *, bidirectional: bool, max_distance: int
) -> jax.Array:
    """T5 relative position bias.

    Args:
      table: (num_buckets, N) learned bias per bucket and head (shared across layers).
      q_pos: (B, T), kv_pos: (B, S) int positions.

    Returns:
      (B, N, T, S) in table's dtype.
    """
    relative = kv_pos[:, None, :] - q_pos[:, :, None]  # (B, T, S)
    buckets = t5_position_buckets(
        relative, bidirectional=bidirectional, num_buckets=table.shape[0], max_distance=max_distance
    )
    return jnp.moveaxis(table[buckets], -1, 1)
