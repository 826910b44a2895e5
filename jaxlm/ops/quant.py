"""Weight-only quantized matmuls: a frozen weight stored as int8 or NF4 codes, dequantized inside the matmul.

Decoding reads every weight once per token, so the bytes a weight takes bound the decode speed: f32 4 bytes
a parameter, int8 1 (+ one f32 scale per output column), NF4 0.52 (`jaxlm.ops.nf4`, double quantization).

A projection weight W (K, O) (its input dims flattened to K, its output dims to O) is stored in strips of
64 output columns, (O/64, K, 64), O zero-padded to a multiple of 64: each strip is one contiguous run of
memory that a CPU kernel streams once (`jaxlm/kernels/quant_matmul.cc`).

  int8 (`Int8`):  per-output-column absmax, W[k, o] ≈ q[o/64, k, o%64] · scale[o], q in [-127, 127].
  NF4:            the strips quantized as one flat NF4 weight, so each block of 64 is one row of a strip
                  (its columns in the order 0, 32, 1, 33, ...: see `_NF4_ORDER`).
  plain (`Plain`): the same strips unquantized, in bfloat16 (2 bytes a parameter) or float32. f32 strips are
                  for speed alone: at a few rows of x, XLA's CPU dot streams the weight and then computes, where
                  the kernel overlaps the two (`jaxlm.quantize`).

An embedding table (V, D) is stored as the strips of its transpose (D, V): an output column is a token, so
int8's per-column scale is one scale a token row, the read-out (a tied output layer, 'MD,VD->MV') is the
strips' matmul, and a lookup gathers one column of a strip a token (`int8_lookup`, `plain_lookup`). (Strips
read out the 49,152 x 576 table of SmolLM2 at 31 GB/s where a row-major table's kernel managed 17.)

`int8_matmul`, `nf4_matmul` and `plain_matmul` compute x·W for x (M, K) -> (M, O); `int8_matmuls`,
`nf4_matmuls` and `plain_matmuls` compute x·W_i for several weights of one kind that take the same x
(attention's q, k and v; a gated MLP's gate and up) in one kernel call, since a decode step's calls each cost
several microseconds whatever their size. On CPU, with the native kernels (`jaxlm.kernels.available()`), the
weight is dequantized in registers as it streams; on other platforms, or without the kernels, with XLA ops
(dequantize, then one dot: XLA's GPU compiler fuses the two). Both give the same values up to summation order. Only x is differentiable (QLoRA trains through these):
dx = dy·Wᵀ with the weight dequantized by XLA.

Plain strips take the kernel at every row count: a strip is a GEMM's packed panel, and at prefill sizes
(M = 768) the kernel matches or beats XLA's own f32 dot (222 against 209 GFLOP/s on (576, 1536) here), where
the XLA path would first write the whole weight out in (K, O) order (a transposing copy of every weight each
step: a third of a scoring prefill's time on SmolLM2). They are inference copies (`jaxlm.quantize`), never
trained. int8 and NF4 (QLoRA's base) take XLA's dot above `KERNEL_MAX_ROWS` rows (training batches): XLA
partitions it over a mesh, where a custom call would run whole on every device.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import kernels
from jaxlm.ops.nf4 import (
    BLOCK,
    NF4,
    dequantize_nf4,
    dynamic_levels,
    nf4_bytes,
    nf4_levels,
    padded_size,
    quantize_nf4,
)

STRIP = 64  # output columns per strip; one NF4 block per strip row
KERNEL_MAX_ROWS = 64  # int8 and NF4: rows of x up to which the CPU kernel runs (decoding and serving)


class Int8(NamedTuple):
    """q: (O/64, K, 64) int8 strips; scale: (O,) float32 per output column (O a multiple of 64)."""

    q: jax.Array
    scale: jax.Array


class Plain(NamedTuple):
    """w: (O/64, K, 64) bfloat16 or float32 strips."""

    w: jax.Array


def _strips(w: jax.Array) -> jax.Array:
    """(K, O) -> (O'/64, K, 64), O' = O rounded up to a multiple of 64 (zero columns)."""
    rows, cols = w.shape
    w = jnp.pad(w, ((0, 0), (0, -cols % STRIP)))
    return w.reshape(rows, -1, STRIP).transpose(1, 0, 2)


def _unstrip(s: jax.Array, cols: int) -> jax.Array:
    """(O'/64, K, 64) -> (K, cols)."""
    return s.transpose(1, 0, 2).reshape(s.shape[1], -1)[:, :cols]


def _absmax_int8(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes and scales of w along `axis` (the reduced dim): w ≈ q · scale."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
    q = jnp.round(w / jnp.where(scale == 0, 1.0, scale))
    return jnp.clip(q, -127, 127).astype(jnp.int8), jnp.squeeze(scale, axis)


def quantize_int8(w: jax.Array) -> Int8:
    """(K, O) float -> `Int8` (one scale per output column)."""
    q, scale = _absmax_int8(w, axis=0)
    pad = -w.shape[1] % STRIP
    return Int8(_strips(q), jnp.pad(scale, (0, pad)))


def dequantize_int8(p: Int8, cols: int, dtype=jnp.float32) -> jax.Array:
    """`Int8` -> the (K, cols) weight."""
    return (_unstrip(p.q, cols).astype(jnp.float32) * p.scale[:cols]).astype(dtype)


# The codes of a strip row (one NF4 block) are stored in the order columns 0, 32, 1, 33, ...: NF4 packs codes
# 2j and 2j + 1 into byte j, so the high nibbles of the 32 bytes are columns 0..31 and the low ones 32..63, and
# a kernel expands each half with one table lookup per 16 codes (no interleaving shuffles).
_NF4_ORDER = np.stack([np.arange(STRIP // 2), np.arange(STRIP // 2, STRIP)], axis=1).reshape(-1)


def quantize_nf4_strips(w: jax.Array) -> NF4:
    """(K, O) float -> NF4 of its strips (block b = strip b // K, row b % K)."""
    return quantize_nf4(_strips(w.astype(jnp.float32))[..., _NF4_ORDER])


def dequantize_nf4_strips(q: NF4, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
    """NF4 strips -> the (rows, cols) weight."""
    strips = -(-cols // STRIP)
    stored = dequantize_nf4(q, (strips, rows, STRIP))
    return _unstrip(stored[..., np.argsort(_NF4_ORDER)], cols).astype(dtype)


def strip_columns(s: jax.Array, ids: jax.Array) -> jax.Array:
    """Columns `ids` (...) of strips (O/64, K, 64) -> (..., K): a table's rows, looked up by token."""
    return s[ids // STRIP, :, ids % STRIP]


def int8_lookup(p: Int8, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` (...) of a table stored as `Int8` strips of its transpose -> (..., D)."""
    return (strip_columns(p.q, ids).astype(jnp.float32) * p.scale[ids][..., None]).astype(dtype)


PLAIN = (jnp.bfloat16, jnp.float32)  # the dtypes `Plain` stores (the kernels' `jaxlm_<bf16|f32>_...`)


def _plain_dtype(w: jax.Array) -> str:
    if w.dtype not in PLAIN:
        raise ValueError(f"plain weights are stored as bfloat16 or float32, not {w.dtype}")
    return "bf16" if w.dtype == jnp.bfloat16 else "f32"


def pack_plain(w: jax.Array, dtype) -> Plain:
    """(K, O) float -> `Plain` strips of `dtype` (bfloat16 or float32)."""
    strips = _strips(w.astype(dtype))
    _plain_dtype(strips)  # refused here, not at the first matmul
    return Plain(strips)


def unpack_plain(p: Plain, cols: int, dtype=jnp.float32) -> jax.Array:
    return _unstrip(p.w, cols).astype(dtype)


def plain_lookup(p: Plain, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` (...) of a table stored as `Plain` strips of its transpose -> (..., D)."""
    return strip_columns(p.w, ids).astype(dtype)


# --- matmuls --------------------------------------------------------------------------------------------------


def _call(target: str, x: jax.Array, cols: tuple[int, ...], *operands) -> list[jax.Array]:
    """One kernel call for one or more weights taking x: (M, cols[i]) float32 each."""
    out = [jax.ShapeDtypeStruct((x.shape[0], c), jnp.float32) for c in cols]
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), *operands)


def _dispatch(x: jax.Array, kernel, xla, max_rows: int | None = None):
    """kernel(x) on CPU with the native kernels, for at most `max_rows` rows of x (None: any); xla(x) elsewhere."""
    if max_rows is not None and x.shape[0] > max_rows:
        return xla(x)
    return kernels.cpu_or(kernel, xla, x)


def _no_grad(a):
    """The zero cotangent of a frozen operand (float0 for integer codes)."""
    if jnp.issubdtype(a.dtype, jnp.integer):
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


def _weight_only_vjp(fwd_fn, weight_fn):
    """Matmuls x (M, K), packed weights (a tuple) -> one (M, O_i) each, differentiable in x only:
    dx = Σ dy_i · weight_fn(packed_i)ᵀ."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def matmuls(x, packed, cols):
        return fwd_fn(x, packed, cols)

    def fwd(x, packed, cols):
        return fwd_fn(x, packed, cols), (x, packed)

    def bwd(cols, res, dys):
        x, packed = res
        dx = sum(jnp.dot(dy.astype(jnp.float32), weight_fn(p, x.shape[1], c).T) for dy, p, c in zip(dys, packed, cols))
        return dx.astype(x.dtype), jax.tree.map(_no_grad, packed)

    matmuls.defvjp(fwd, bwd)
    return matmuls


def _outputs(ys, cols, dtype) -> tuple[jax.Array, ...]:
    return tuple(y[:, :c].astype(dtype) for y, c in zip(ys, cols))


def _int8_fwd(x, ps: tuple[Int8, ...], cols):
    def kernel(x):
        ys = _call("jaxlm_int8_matmul", x, tuple(p.scale.shape[0] for p in ps), *(a for p in ps for a in p))
        return _outputs(ys, cols, x.dtype)

    def xla(x):
        return tuple(jnp.dot(x, dequantize_int8(p, c, x.dtype)) for p, c in zip(ps, cols))

    return _dispatch(x, kernel, xla, KERNEL_MAX_ROWS)


def _nf4_fwd(x, qs: tuple[NF4, ...], cols):
    rows, padded = x.shape[1], tuple(-(-c // STRIP) * STRIP for c in cols)
    # Before any compile. The codes are padded to whole blocks of 16,384, so the kernel would compute with a
    # smaller K without complaint; this catches a K off by a block or more (`QuantizedWeight` checks exactly).
    for q, c, p in zip(qs, cols, padded):
        if 2 * q.codes.shape[0] != padded_size(rows * p):
            raise ValueError(
                f"nf4 matmul: x has {rows} columns; the weight's codes are of another shape than ({rows}, {c})"
            )

    def kernel(x):
        consts = (jnp.asarray(nf4_levels()), jnp.asarray(dynamic_levels()))
        weights = (a for q in qs for a in (q.codes, q.absmax_codes, q.absmax_scale, q.absmax_offset.reshape(1)))
        return _outputs(_call("jaxlm_nf4_matmul", x, padded, *consts, *weights), cols, x.dtype)

    def xla(x):
        return tuple(jnp.dot(x, dequantize_nf4_strips(q, rows, c, x.dtype)) for q, c in zip(qs, cols))

    return _dispatch(x, kernel, xla, KERNEL_MAX_ROWS)


def _plain_fwd(x, ps: tuple[Plain, ...], cols):
    dtypes = {_plain_dtype(p.w) for p in ps}
    if len(dtypes) != 1:
        raise ValueError(f"one call's plain weights share one dtype, not {sorted(dtypes)}")

    def kernel(x):
        ys = _call(f"jaxlm_{next(iter(dtypes))}_matmul", x, tuple(p.w.shape[0] * STRIP for p in ps), *(p.w for p in ps))
        return _outputs(ys, cols, x.dtype)

    def xla(x):
        return tuple(jnp.dot(x, unpack_plain(p, c, x.dtype)) for p, c in zip(ps, cols))

    return _dispatch(x, kernel, xla)


_int8 = _weight_only_vjp(_int8_fwd, lambda p, K, cols: dequantize_int8(p, cols))
_nf4 = _weight_only_vjp(_nf4_fwd, lambda q, K, cols: dequantize_nf4_strips(q, K, cols))
_plain = _weight_only_vjp(_plain_fwd, lambda p, K, cols: unpack_plain(p, cols))


def int8_matmuls(x: jax.Array, ps: tuple[Int8, ...], cols: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """x (M, K) · W_i (K, cols[i]) for each W_i stored as `Int8` -> a tuple of (M, cols[i]), in x's dtype: one
    kernel call for all of them."""
    return _int8(x, tuple(ps), tuple(cols))


def nf4_matmuls(x: jax.Array, qs: tuple[NF4, ...], cols: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """`int8_matmuls` for weights stored as NF4 strips (`quantize_nf4_strips`)."""
    return _nf4(x, tuple(qs), tuple(cols))


def plain_matmuls(x: jax.Array, ps: tuple[Plain, ...], cols: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """`int8_matmuls` for weights stored as `Plain` strips, all of one dtype."""
    return _plain(x, tuple(ps), tuple(cols))


def int8_matmul(x: jax.Array, p: Int8, cols: int) -> jax.Array:
    """x (M, K) · W (K, cols) stored as `Int8` -> (M, cols), in x's dtype."""
    return int8_matmuls(x, (p,), (cols,))[0]


def nf4_matmul(x: jax.Array, q: NF4, cols: int) -> jax.Array:
    """x (M, K) · W (K, cols) stored as NF4 strips (`quantize_nf4_strips`) -> (M, cols), in x's dtype."""
    return nf4_matmuls(x, (q,), (cols,))[0]


def plain_matmul(x: jax.Array, p: Plain, cols: int) -> jax.Array:
    """x (M, K) · W (K, cols) stored as `Plain` strips -> (M, cols), in x's dtype."""
    return plain_matmuls(x, (p,), (cols,))[0]


def packed_bytes(packed) -> int:
    """Storage of a quantized weight (any of the tuples above) in bytes: `nf4_bytes`' count, for every packing."""
    return nf4_bytes(packed)


__all__ = [
    "BLOCK",
    "Int8",
    "PLAIN",
    "Plain",
    "STRIP",
    "dequantize_int8",
    "dequantize_nf4_strips",
    "int8_lookup",
    "int8_matmul",
    "int8_matmuls",
    "nf4_matmul",
    "nf4_matmuls",
    "pack_plain",
    "packed_bytes",
    "plain_lookup",
    "plain_matmul",
    "plain_matmuls",
    "quantize_int8",
    "quantize_nf4_strips",
    "strip_columns",
    "unpack_plain",
]
