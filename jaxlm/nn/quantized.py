"""Frozen weights stored quantized (`jaxlm.ops.quant`): NF4 (QLoRA's base, `--weights nf4`), int8
(`--weights int8`), bfloat16 (`--weights bf16`) or float32 strips (`--weights f32`, the CPU default), for the
layer stacks' projections, and int8, bfloat16 or float32 strips of the token embedding table (transposed).

A `QuantizedWeight` stands where an `nnx.Param` weight (I..., O...) stood: `project` calls its `matmul`, which
dequantizes inside the matmul; `w[...]` gives the dequantized weight (export, merging LoRA). Codes and
constants are `Quantized` variables: state like parameters, never trained, with a leading `layers` axis in a
stack, so they are sliced, scanned and unstacked with the layer's other parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.ops.nf4 import NF4
from jaxlm.ops.quant import (
    Int8,
    Plain,
    dequantize_int8,
    dequantize_nf4_strips,
    int8_lookup,
    int8_matmul,
    int8_matmuls,
    nf4_matmuls,
    pack_plain,
    packed_bytes,
    plain_lookup,
    plain_matmul,
    plain_matmuls,
    quantize_int8,
    quantize_nf4_strips,
    unpack_plain,
)


class Quantized(nnx.Variable):
    """Frozen quantized storage (codes and constants): never differentiated."""


class QuantizedWeight(nnx.Module):
    """A frozen weight (I..., O...) whose first `n_in` dims are contracted; `layers` > 0: one per stacked layer.

    experts: the weight is a mixture's expert stack (E, I..., O...), each expert quantized apart (its own
    scales); it is read whole, dequantized (`w[...]`), by the experts' grouped matmuls."""

    packing: type  # the NamedTuple of codes and constants (`jaxlm.ops.quant`)

    def __init__(
        self,
        w: jax.Array,
        *,
        n_in: int,
        layers: int = 0,
        experts: bool = False,
        dtype=jnp.float32,
        axes: tuple | None = None,
    ):
        self.shape = tuple(w.shape[1:] if layers else w.shape)  # one layer's weight
        self.n_in, self.experts = n_in, experts
        self.axes = axes  # the logical axes of the weight it stores (`w[...]` gives them back)
        self.dtype = dtype  # the dtype it dequantizes to (the original parameter dtype)
        matrix = self.shape[1:] if experts else self.shape
        self.rows, self.cols = math.prod(matrix[:n_in]), math.prod(matrix[n_in:])
        lead = ("layers",) * bool(layers) + ("experts",) * experts  # axes packed one slice at a time
        flat = w.reshape(*w.shape[: len(lead)], self.rows, self.cols)
        pack = self.pack
        for _ in lead:
            pack = jax.vmap(pack)
        for name, a in pack(flat)._asdict().items():
            setattr(self, name, Quantized(a, out_sharding=(*lead, None, None, None)[: a.ndim], eager_sharding=False))

    def packed(self):
        return self.packing(*(getattr(self, name)[...] for name in self.packing._fields))

    def layers(self) -> int:
        """Stacked layers stored (0: one unstacked weight, as a layer's slice or the engine's copy holds)."""
        first = self.packed()[0]
        return first.shape[0] if first.ndim > self._ndim + self.experts else 0

    def __getitem__(self, index):  # reads like a parameter: w[...] is the dequantized weight
        unpack = lambda p: self.unpack(p).reshape(self.shape[self.experts :]).astype(self.dtype)  # noqa: E731
        for _ in range(bool(self.layers()) + self.experts):
            unpack = jax.vmap(unpack)
        return unpack(self.packed())[index]

    def matmul(self, x: jax.Array, n: int) -> jax.Array:
        """x (..., I...) · W -> (..., O...), in x's dtype; the weight is dequantized inside the matmul."""
        return matmuls((self,), x, n)[0]

    def _check(self, x: jax.Array, n: int) -> None:
        if self.experts:
            raise ValueError("an expert stack is read whole (w[...]) by the experts' grouped matmuls")
        if n != self.n_in:
            raise ValueError(f"a weight quantized for {self.n_in} input dims is contracted over {n}")
        if tuple(x.shape[x.ndim - n :]) != tuple(self.shape[:n]):  # the reshape in `matmuls` would not notice
            raise ValueError(f"x ends in {tuple(x.shape[x.ndim - n :])}; the weight takes {tuple(self.shape[:n])}")

    def nbytes(self) -> int:
        return packed_bytes(self.packed())


def fusable(weights) -> bool:
    """Whether `matmuls` computes `weights` in one kernel call: quantized weights of one class (so one storage
    dtype), none an expert stack, all taking the same input dims."""
    first = weights[0]
    return isinstance(first, QuantizedWeight) and all(
        type(w) is type(first) and not w.experts and w.shape[: w.n_in] == first.shape[: first.n_in] for w in weights
    )


def matmuls(weights, x: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """x (..., I...) · W -> (..., O...) for each of `weights` (`fusable`), in x's dtype, in one kernel call."""
    for w in weights:
        if not isinstance(w, QuantizedWeight):
            raise ValueError(f"{type(w).__name__} is not a quantized weight")
        w._check(x, n)
    if not fusable(weights):
        raise ValueError(f"one call takes quantized weights of one kind: {[type(w).__name__ for w in weights]}")
    lead = x.shape[: x.ndim - n]
    first = weights[0]
    ys = first.apply(x.reshape(-1, first.rows), tuple(w.packed() for w in weights), tuple(w.cols for w in weights))
    return tuple(y.reshape(*lead, *w.shape[n:]) for y, w in zip(ys, weights))


class Int8Weight(QuantizedWeight):
    """int8 codes, one absmax scale per output column: 1 byte a parameter (+ 4 per column)."""

    packing, _ndim = Int8, 3

    def pack(self, w):
        return quantize_int8(w)

    def unpack(self, p):
        return dequantize_int8(p, self.cols)

    @staticmethod
    def apply(x, packs, cols):
        return int8_matmuls(x, packs, cols)


class NF4Weight(QuantizedWeight):
    """NF4 with double quantization (bitsandbytes' format, QLoRA): 0.516 bytes a parameter."""

    packing, _ndim = NF4, 1

    def pack(self, w):
        return quantize_nf4_strips(w)

    def unpack(self, p):
        return dequantize_nf4_strips(p, self.rows, self.cols)

    @staticmethod
    def apply(x, packs, cols):
        return nf4_matmuls(x, packs, cols)


class PlainWeight(QuantizedWeight):
    """Unquantized strips of `store` (a subclass's dtype)."""

    packing, _ndim, store = Plain, 3, None

    def pack(self, w):
        return pack_plain(w, self.store)

    def unpack(self, p):
        return unpack_plain(p, self.cols)

    @staticmethod
    def apply(x, packs, cols):
        return plain_matmuls(x, packs, cols)


class BF16Weight(PlainWeight):
    """bfloat16 strips: 2 bytes a parameter, converted to float32 in registers."""

    store = jnp.bfloat16


class F32Weight(PlainWeight):
    """float32 strips: the weight's own values, laid out for the CPU decode kernel (4 bytes a parameter)."""

    store = jnp.float32


class QuantizedTable(nnx.Module):
    """A token embedding table (V, D) stored as the strips of its transpose (`jaxlm.ops.quant`): looked up (a
    column of a strip a token), and read out (tied) by the strips' matmul."""

    packing: type

    def __init__(self, table: jax.Array, *, axes: tuple | None = None):
        self.axes, self.dtype, self.vocab = axes, table.dtype, table.shape[0]
        for name, a in self.pack(table.T)._asdict().items():
            setattr(self, name, Quantized(a, out_sharding=("vocab", None, None)[: a.ndim], eager_sharding=False))

    def packed(self):
        return self.packing(*(getattr(self, name)[...] for name in self.packing._fields))

    def __getitem__(self, index):
        return self.unpack(self.packed(), self.vocab).T.astype(self.dtype)[index]

    def attend(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., V) logits: 'BTD,VD->BTV'."""
        return self.read_out(x.reshape(-1, x.shape[-1]), self.packed(), self.vocab).reshape(*x.shape[:-1], -1)

    def lookup(self, tokens: jax.Array, dtype) -> jax.Array:
        """(B, T) int -> (B, T, D)."""
        return self.rows(self.packed(), tokens, dtype)

    def nbytes(self) -> int:
        return packed_bytes(self.packed())


class Int8Table(QuantizedTable):
    """int8, one absmax scale a token row."""

    packing = Int8

    def pack(self, table_t):
        return quantize_int8(table_t)

    def unpack(self, p, vocab):
        return dequantize_int8(p, vocab)

    def rows(self, p, tokens, dtype):
        return int8_lookup(p, tokens, dtype)

    def read_out(self, x, p, vocab):
        return int8_matmul(x, p, vocab)


class PlainTable(QuantizedTable):
    """Unquantized, of `store` (a subclass's dtype)."""

    packing, store = Plain, None

    def pack(self, table_t):
        return pack_plain(table_t, self.store)

    def unpack(self, p, vocab):
        return unpack_plain(p, vocab)

    def rows(self, p, tokens, dtype):
        return plain_lookup(p, tokens, dtype)

    def read_out(self, x, p, vocab):
        return plain_matmul(x, p, vocab)


class BF16Table(PlainTable):
    """bfloat16."""

    store = jnp.bfloat16


class F32Table(PlainTable):
    """float32: the table's own values, laid out for the CPU decode kernel."""

    store = jnp.float32
