"""GPipe pipeline parallelism written as one SPMD program.

The layers' parameters are stacked (L, ...) and sharded over the `pipeline`
mesh axis, so stage s holds layers [s L/P, (s+1) L/P). Each of the M + P - 1
iterations runs every stage at once (a `vmap` over stages whose mapped axis is
the `pipeline` mesh axis) on the micro-batch that has reached it, then shifts
the stage outputs one stage on (`jnp.roll`, a collective permute on the mesh).
Gradients come from differentiating this loop, which gives GPipe's schedule:
all forwards, then all backwards. This follows the "circular pipeline in
GSPMD" construction of praxis/MaxText with one repeat.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.parallel.rules import active_mesh, constrain


def _to_stages(params, num_stages: int):
    """(L, ...) leaves -> (P, L/P, ...), stage axis on the `pipeline` mesh axis."""
    mesh = active_mesh()

    def split(a):
        a = a.reshape(num_stages, a.shape[0] // num_stages, *a.shape[1:])
        if mesh is None:
            return a
        spec = P("pipeline", *([P.UNCONSTRAINED] * (a.ndim - 1)))
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    return jax.tree.map(split, params)


def gpipe(
    stage_fn: Callable,
    layer_params,
    x: jax.Array,
    extras,
    *,
    num_stages: int,
    num_microbatches: int,
) -> jax.Array:
    """Runs `stage_fn` over P stages and M micro-batches in a GPipe schedule.

    Args:
      stage_fn: (stage_params, x (b, T, D), extras_b) -> (b, T, D), one stage on one micro-batch;
        stage_params leaves are (L/P, ...).
      layer_params: pytree of (L, ...) stacked layer parameters.
      x: (B, T, D) activations entering the first layer.
      extras: pytree of per-row inputs (B, ...) (positions, masks) every stage sees.

    Returns:
      (B, T, D) activations after the last layer; row order as in x.
    """
    Pn, M = num_stages, num_microbatches
    B = x.shape[0]
    b = B // M
    # Micro-batch m = rows m, m + M, ...: strided so every data-parallel shard feeds every micro-batch.
    split = lambda a: a.reshape(b, M, *a.shape[1:]).swapaxes(0, 1)  # noqa: E731
    xs, ex = split(x), jax.tree.map(split, extras)
    stage_params = _to_stages(layer_params, Pn)
    run = jax.vmap(stage_fn, spmd_axis_name="pipeline" if active_mesh() is not None else None)
    state_axes = ("stages", "batch", "seq", "embed")

    def tick(carry, t):
        state, out = carry
        state = state.at[0].set(xs[jnp.minimum(t, M - 1)])
        micro = jnp.clip(t - jnp.arange(Pn), 0, M - 1)  # micro-batch each stage holds now
        ex_t = jax.tree.map(lambda a: constrain(a[micro], ("stages", "batch") + (None,) * (a.ndim - 2)), ex)
        y = run(stage_params, state, ex_t)
        # The last stage finishes micro-batch t - (P - 1); earlier writes to slot 0 are overwritten.
        out = jax.lax.dynamic_update_index_in_dim(out, y[-1], jnp.maximum(t - (Pn - 1), 0), 0)
        return (constrain(jnp.roll(y, 1, axis=0), state_axes), out), None

    state = constrain(jnp.zeros((Pn, *xs.shape[1:]), x.dtype), state_axes)
    (_, out), _ = jax.lax.scan(tick, (state, jnp.zeros_like(xs)), jnp.arange(M + Pn - 1))
    return out.swapaxes(0, 1).reshape(x.shape)
