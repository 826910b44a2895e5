"""Feed-forward networks as pure functions: plain MLP and gated (GLU) MLP.

Gated: Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU = silu gate).
D model width, F hidden width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.dense import dense
from jaxlm.ops.dropout import dropout

ACTIVATIONS = {  # the names of jaxlm.choices.ACTIVATIONS
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # GELU's sigmoid approximation (CLIP, gpt-oss)
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    b_in: jax.Array | None = None,
    b_out: jax.Array | None = None,
    *,
    act: str = "gelu",
    dropout_rate: float = 0.0,
    dropout_keys: jax.Array | None = None,
) -> jax.Array:
    """act(x·w_in + b_in)·w_out + b_out. x: (B, ..., D), w_in: (D, F), w_out: (F, D).

    dropout_rate / dropout_keys (B, 2): dropout on the hidden activations (T5); no keys, no dropout.
    """
    h = hidden_activation(dense(x, w_in), b_in, act=act, dropout_rate=dropout_rate, dropout_keys=dropout_keys)
    y = dense(h, w_out)  # ...F,FD->...D
    return y if b_out is None else y + b_out


def hidden_activation(h, b_in=None, *, act: str, dropout_rate: float = 0.0, dropout_keys=None) -> jax.Array:
    """The plain MLP's hidden layer from its input projection h = x·w_in (..., F): dropout(act(h + b_in))."""
    if b_in is not None:
        h = h + b_in
    return dropout(activation(act)(h), dropout_rate, dropout_keys)


def gated_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_out: jax.Array,
    *,
    act: str = "silu",
    clamp: float = 0.0,
    up_shift: float = 0.0,
    dropout_rate: float = 0.0,
    dropout_keys: jax.Array | None = None,
) -> jax.Array:
    """(act(x·w_gate) * (x·w_up))·w_out; SwiGLU with act="silu". x: (B, ..., D), weights (D, F), (D, F), (F, D).

    clamp, up_shift: see `gated_activation`.
    dropout_rate / dropout_keys (B, 2): dropout on the gated hidden activations (T5 v1.1); no keys, no dropout.
    """
    h = gated_activation(
        dense(x, w_gate),
        dense(x, w_up),
        act=act,
        clamp=clamp,
        up_shift=up_shift,
        dropout_rate=dropout_rate,
        dropout_keys=dropout_keys,
    )
    return dense(h, w_out)  # ...F,FD->...D


def gated_activation(
    gate, up, *, act: str, clamp: float = 0.0, up_shift: float = 0.0, dropout_rate: float = 0.0, dropout_keys=None
) -> jax.Array:
    """The gated MLP's hidden layer from x·w_gate and x·w_up (..., F): dropout(act(gate) * (up + up_shift)).

    clamp > 0 first clips the gate to <= clamp and up to [-clamp, clamp] (gpt-oss's SwiGLU: clamp 7, shift 1,
    act quick_gelu)."""
    if clamp:
        gate, up = jnp.minimum(gate, clamp), jnp.clip(up, -clamp, clamp)
    if up_shift:
        up = up + up_shift
    return dropout(activation(act)(gate) * up, dropout_rate, dropout_keys)
