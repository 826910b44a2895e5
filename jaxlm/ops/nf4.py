"""4-bit NormalFloat (NF4) with double quantization (Dettmers et al. 2023, "QLoRA"), as bitsandbytes stores it.

A weight is flattened and cut into blocks of 64. Each block keeps its absmax
c1 (float) and 4-bit codes: the index of the NF4 level nearest to w / c1. NF4's
16 levels are quantiles of N(0, 1) with an exact zero, scaled to [-1, 1]
(`nf4_levels`, bitsandbytes' `create_normal_map`). Double quantization then
stores the absmax constants themselves in 8 bits: their mean is subtracted, and
blocks of 256 keep a float32 absmax c2 and 8-bit codes of bitsandbytes' dynamic
map (`dynamic_levels`). Per base parameter: 4 + 8/64 + 32/(64·256) = 4.127 bits.

Codes are packed two per byte, the first of a pair in the high nibble, as
bitsandbytes packs them. Quantization is nearest-level rounding (ties go to
the lower level); dequantization is a table lookup times the block's absmax.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

BLOCK = 64  # weights per absmax (first level)
BLOCK2 = 256  # absmax constants per second-level scale (double quantization)


@functools.cache
def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels (float32, ascending): 8 negative and 9 non-negative normal quantiles, scaled to [-1, 1].

    offset = 0.9677 is bitsandbytes' (and the paper's) choice: the quantiles of (1 - offset, offset) avoid
    the infinite tails.
    """
    offset = 0.9677083
    ppf = lambda p: np.asarray(ndtri(jnp.asarray(p, jnp.float32)), np.float64)  # noqa: E731
    with jax.ensure_compile_time_eval():  # constants, also when first asked for under jit
        positive = ppf(np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1])
        negative = -ppf(np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]).astype(np.float32))
    return levels / levels.max()


@functools.cache
def dynamic_levels() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map`): 256 float32 levels in [-1, 1]."""
    data = []
    for i in range(7):  # exponent 10^(i-6) with 2^i fraction steps
        bounds = np.linspace(0.1, 1, 2**i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10.0 ** (-6 + i) * means).tolist() + (-(10.0 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, np.float32))


def _nearest(x: jax.Array, levels: np.ndarray) -> jax.Array:
    """Index of the level nearest to each x (levels ascending): the count of midpoints below x."""
    mids = jnp.asarray((levels[1:] + levels[:-1]) / 2, jnp.float32)
    return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)


class NF4(NamedTuple):
    """A quantized weight; every field is an array (a pytree), so it can be stacked over layers and sharded.

    codes: (n / 2,) uint8, two 4-bit codes per byte.
    absmax_codes: (m,) uint8, the first-level absmax constants (m = n / 64) in the dynamic 8-bit map.
    absmax_scale: (m / 256,) float32, the second-level absmax of each block of 256 constants.
    absmax_offset: () float32, the mean subtracted from the constants before their quantization.
    """

    codes: jax.Array
    absmax_codes: jax.Array
    absmax_scale: jax.Array
    absmax_offset: jax.Array


def padded_size(n: int) -> int:
    """Elements after padding to whole first- and second-level blocks."""
    return math.ceil(n / (BLOCK * BLOCK2)) * BLOCK * BLOCK2


def quantize_nf4(w: jax.Array) -> NF4:
    """Any-shape float weight -> NF4 with double quantization (flattened; zero-padded to whole blocks)."""
    flat = w.astype(jnp.float32).reshape(-1)
    flat = jnp.pad(flat, (0, padded_size(flat.size) - flat.size))
    blocks = flat.reshape(-1, BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # (m,)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    q = _nearest(normed, nf4_levels()).reshape(-1, 2)
    codes = (q[:, 0] << 4) | q[:, 1]
    offset = jnp.mean(absmax)
    centred = (absmax - offset).reshape(-1, BLOCK2)
    scale = jnp.max(jnp.abs(centred), axis=1)  # (m / 256,)
    absmax_codes = _nearest(centred / jnp.where(scale == 0, 1.0, scale)[:, None], dynamic_levels()).reshape(-1)
    return NF4(codes, absmax_codes, scale, offset)


def dequantize_nf4(q: NF4, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """NF4 -> the weight of `shape` in `dtype` (the zero padding dropped)."""
    absmax = jnp.asarray(dynamic_levels())[q.absmax_codes.astype(jnp.int32)].reshape(-1, BLOCK2)
    absmax = (absmax * q.absmax_scale[:, None]).reshape(-1) + q.absmax_offset  # (m,)
    nibbles = jnp.stack([q.codes >> 4, q.codes & 15], axis=-1).reshape(-1, BLOCK).astype(jnp.int32)
    w = jnp.asarray(nf4_levels())[nibbles] * absmax[:, None]
    return w.reshape(-1)[: math.prod(shape)].reshape(shape).astype(dtype)


def nf4_bytes(q: NF4) -> int:
    """Storage of a quantized weight in bytes."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in q)
