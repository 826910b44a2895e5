"""Low-rank adaptation (Hu et al. 2021, "LoRA"), with Hugging Face peft's conventions exactly.

A frozen projection W (I..., O...) gains a trainable update scale · A B of rank R:
A (I..., R), B (R, O...), so y = x·W + scale · (dropout(x)·A)·B. As in peft:
A starts Kaiming-uniform with a = sqrt(5) (uniform in ±1/sqrt(fan_in)), B at zero
(the adapted model starts as the base), scale = alpha / R, or alpha / sqrt(R)
with rsLoRA (Kalajdzievski 2023). peft stores A as (R, I) and B as (O, R) in
torch's Linear layout; `jaxlm.hf.peft` converts.

An embedding table (V, D) adapts as peft's `Embedding`: A (V, R), B (R, D), the
row of A looked up by token id, A zero and B normal(0, 1) at init.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.ops.dense import dense


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / rank, or alpha / sqrt(rank) (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_lora(key: jax.Array, in_shape: tuple, out_shape: tuple, rank: int, dtype=jnp.float32):
    """(A (I..., R) Kaiming-uniform(a=sqrt(5)), B (R, O...) zeros), as peft's `reset_lora_parameters`."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)
    a = jax.random.uniform(key, (*in_shape, rank), jnp.float32, -bound, bound)
    return a.astype(dtype), jnp.zeros((rank, *out_shape), dtype)


def init_embedding_lora(key: jax.Array, vocab: int, dim: int, rank: int, dtype=jnp.float32):
    """(A (V, R) zeros, B (R, D) standard normal), as peft's `reset_lora_parameters` for embeddings."""
    return jnp.zeros((vocab, rank), dtype), jax.random.normal(key, (rank, dim), jnp.float32).astype(dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, n: int = 1) -> jax.Array:
    """scale · (x·A)·B: x (..., I...) with n input dims, A (I..., R), B (R, O...) -> (..., O...) in x's dtype.

    'BTD,DR->BTR' then 'BTR,RNH->BTNH' for a q projection; 'BTNH,NHR->BTR', 'BTR,RD->BTD' for the output.
    """
    h = dense(x, a.astype(x.dtype), n)
    return dense(h, b.astype(x.dtype), 1) * jnp.asarray(scale, x.dtype)


def embedding_lora_delta(tokens: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype) -> jax.Array:
    """scale · A[tokens]·B: tokens (B, T) int, A (V, R), B (R, D) -> (B, T, D)."""
    h = jnp.take(a, tokens, axis=0).astype(dtype)
    return dense(h, b.astype(dtype), 1) * jnp.asarray(scale, dtype)


def lora_weight(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The merged update scale · A·B (I..., O...) in float32: W + this is the merged weight."""
    return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), 1)


def lora_bank_delta(x: jax.Array, a: jax.Array, b: jax.Array, scales: jax.Array, rows: jax.Array, n: int = 1):
    """Each row's own LoRA out of a bank of M (multi-LoRA serving): x (B, T, I...) with n input dims,
    A (I..., M, R), B (M, R, O...), scales (M,), rows (B, M) one-hot (the row's adapter; all zero: none)
    -> (B, T, O...) in x's dtype.

    Two plain matmuls over the bank's M·R columns, the other adapters' zeroed between them: every adapter's
    A is read once per step, not gathered per row, for M·R of the I·O multiply-adds a token's projection
    costs. Adapters of lower rank are zero-padded to R (zero columns add nothing)."""
    M, R = a.shape[-2:]
    h = dense(x, a.reshape(*a.shape[:-2], M * R).astype(x.dtype), n)  # (B, T, M·R)
    h = h * jnp.repeat(rows, R, axis=1).astype(x.dtype)[:, None]
    y = dense(h, b.reshape(M * R, *b.shape[2:]).astype(x.dtype), 1)
    scale = (rows @ scales.astype(jnp.float32)).astype(x.dtype)  # (B,): the row's adapter's scale
    return y * scale.reshape(-1, *[1] * (y.ndim - 1))


def embedding_lora_bank_delta(tokens: jax.Array, a: jax.Array, b: jax.Array, scales: jax.Array, rows: jax.Array, dtype):
    """`embedding_lora_delta` of each row's adapter: tokens (B, T) int, A (V, M, R), B (M, R, D), scales (M,),
    rows (B, M) one-hot -> (B, T, D)."""
    V, M, R = a.shape
    h = jnp.take(a.reshape(V, M * R), tokens, axis=0).astype(dtype)  # (B, T, M·R)
    h = h * jnp.repeat(rows, R, axis=1).astype(dtype)[:, None]
    y = dense(h, b.reshape(M * R, -1).astype(dtype), 1)
    return y * (rows @ scales.astype(jnp.float32)).astype(dtype)[:, None, None]
