"""Dense contractions (every projection of the model) with a backward pass that suits CPU GEMMs.

`dense(x, w, n)` contracts the last n dims of x with the first n dims of w, like
`jnp.tensordot(x, w, n)`: 'BTD,DNH->BTNH' (q/k/v), 'BTNH,NHD->BTD' (output),
'BTD,DF->BTF' (MLP), 'BTD,DV->BTV' (read-out). Its forward is that one dot.

Why a custom VJP: the weight gradient dW = x^T · dy contracts over every token, so
one operand must be laid out token-minor. Left to itself, XLA's CPU backend often
transposes the larger operand, and fuses the transpose into the elementwise
producer of dy (the SwiGLU or softmax backward), which then writes with a stride:
that made the backward pass 3x the forward. Here the smaller of x and dy (fewer
columns) is transposed once, behind an optimization barrier so it stays one
contiguous copy, and the (small) weight-shaped result is transposed back if
needed. Same math; sums reassociate only inside the GEMM.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, n: int = 1) -> jax.Array:
    """tensordot(x, w, n): x (..., I1..In), w (I1..In, O...) -> (..., O...), in x's dtype."""
    return jnp.tensordot(x, w, n)


def _dense_fwd(x, w, n):
    return jnp.tensordot(x, w, n), (x, w)


def _token_major_transpose(a: jax.Array) -> jax.Array:
    """(M, C) -> (C, M) as a real copy (the barrier keeps XLA from folding it into a strided dot operand)."""
    return jax.lax.optimization_barrier(a.T)


def _dense_bwd(n, res, dy):
    x, w = res
    lead, inner = x.shape[: x.ndim - n], x.shape[x.ndim - n :]
    out = w.shape[n:]
    rows, n_in, n_out = math.prod(lead), math.prod(inner), math.prod(out)
    x2, g2 = x.reshape(rows, n_in), dy.reshape(rows, n_out).astype(x.dtype)
    dx = jnp.dot(g2, w.reshape(n_in, n_out).T).reshape(x.shape)
    if n_in <= n_out:  # transpose the narrower activation: x^T (in, rows) @ dy (rows, out)
        dw = jnp.dot(_token_major_transpose(x2), g2)
    else:  # dy^T (out, rows) @ x (rows, in), then the small (out, in) result back
        dw = jnp.dot(_token_major_transpose(g2), x2).T
    return dx, dw.reshape(w.shape).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
