"""Pipeline parallelism (GPipe, or circular with repeats) written as one SPMD program.

The layers' parameters are stacked (L, ...) and split into P x R chunks of
L/(PR) consecutive layers; stage s holds chunks s, P + s, ..., (R-1)P + s and
its slice of the stack lives on its device of the `pipeline` mesh axis. Each
iteration runs every stage at once (a `vmap` over stages whose mapped axis is
the `pipeline` mesh axis) on the micro-batch that has reached it, then shifts
the stage outputs one stage on (`jnp.roll`, a collective permute on the mesh);
the last stage's output wraps around to stage 0 for the micro-batch's next
repeat. Gradients come from differentiating this loop: all forwards, then all
backwards.

R = 1 is GPipe: M + P - 1 iterations of L/P layers, a bubble of (P-1)/(M+P-1).
R > 1 is the circular schedule of praxis/MaxText: micro-batches enter in groups
of P, M R + P - 1 iterations of L/(PR) layers, so the bubble (P - 1 iterations)
costs R times less.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.axes import active_mesh, constrain


def _to_stages(params, num_stages: int, num_repeats: int):
    """(L, ...) leaves -> (P, R, L/(PR), ...): chunk r P + s at [s, r], stage axis on the `pipeline` mesh axis."""
    mesh = active_mesh()

    def split(a):
        a = a.reshape(num_repeats, num_stages, a.shape[0] // (num_stages * num_repeats), *a.shape[1:])
        a = a.swapaxes(0, 1)
        if mesh is None:
            return a
        spec = P("pipeline", *([P.UNCONSTRAINED] * (a.ndim - 1)))
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    return jax.tree.map(split, params)


def schedule(t, num_stages: int, num_microbatches: int, num_repeats: int):
    """What each stage does at iteration t: (micro-batch (P,), repeat (P,), busy (P,) bool).

    Stage s runs virtual stage r P + s of micro-batch m at t = s + (g R + r) P + j, where m = g P + j:
    micro-batches enter in groups of P, and a group makes all R rounds before the next one enters.
    With R = 1 this is m = t - s.
    """
    u = t - jnp.arange(num_stages)  # iterations since stage s started
    busy = (u >= 0) & (u < num_microbatches * num_repeats)
    u = jnp.clip(u, 0, num_microbatches * num_repeats - 1)
    j, q = u % num_stages, u // num_stages
    micro = jnp.minimum((q // num_repeats) * num_stages + j, num_microbatches - 1)
    return micro, q % num_repeats, busy


def pipeline(
    stage_fn: Callable,
    layer_params,
    x: jax.Array,
    extras,
    *,
    num_stages: int,
    num_microbatches: int,
    num_repeats: int = 1,
) -> jax.Array:
    """Runs the stacked layers as a pipeline of P stages over M micro-batches, R rounds each.

    Args:
      stage_fn: (chunk_params, x (b, T, D), extras_b) -> (b, T, D), one chunk of L/(PR) layers on one
        micro-batch; chunk_params leaves are (L/(PR), ...).
      layer_params: pytree of (L, ...) stacked layer parameters.
      x: (B, T, D) activations entering the first layer.
      extras: pytree of per-row inputs (B, ...) (positions, masks, dropout keys) every stage sees.
      num_repeats: R; R > 1 needs M divisible by P.

    Returns:
      (B, T, D) activations after the last layer; row order as in x.
    """
    Pn, M, R = num_stages, num_microbatches, num_repeats
    L = jax.tree.leaves(layer_params)[0].shape[0]
    if L % (Pn * R) or x.shape[0] % M or (R > 1 and M % Pn):
        raise ValueError(f"pipeline: {L} layers, {x.shape[0]} rows, P={Pn} stages, M={M} micro-batches, R={R}")
    b = x.shape[0] // M
    # Micro-batch m = rows m, m + M, ...: strided so every data-parallel shard feeds every micro-batch.
    split = lambda a: a.reshape(b, M, *a.shape[1:]).swapaxes(0, 1)  # noqa: E731
    xs, ex = split(x), jax.tree.map(split, extras)
    stage_params = _to_stages(layer_params, Pn, R)

    def chunk(p, r, x, ex):
        r = r if R > 1 else 0  # GPipe: a static index, no gather
        return stage_fn(jax.tree.map(lambda a: a[r], p), x, ex)

    run = jax.vmap(chunk, spmd_axis_name="pipeline" if active_mesh() is not None else None)
    state_axes = ("stages", "batch", "seq", "embed")

    def tick(carry, t):
        state, out = carry
        micro, repeat, busy = schedule(t, Pn, M, R)
        # Stage 0 takes a fresh micro-batch on its first round, else what the last stage passed round.
        state = state.at[0].set(jnp.where(repeat[0] == 0, xs[micro[0]], state[0]))
        ex_t = jax.tree.map(lambda a: constrain(a[micro], ("stages", "batch") + (None,) * (a.ndim - 2)), ex)
        y = run(stage_params, repeat, state, ex_t)
        done = busy[-1] & (repeat[-1] == R - 1)  # the last stage finished micro-batch micro[-1]
        out = out.at[micro[-1]].set(jnp.where(done, y[-1], out[micro[-1]]))
        return (constrain(jnp.roll(y, 1, axis=0), state_axes), out), None

    state = constrain(jnp.zeros((Pn, *xs.shape[1:]), x.dtype), state_axes)
    (_, out), _ = jax.lax.scan(tick, (state, jnp.zeros_like(xs)), jnp.arange(M * R + Pn - 1))
    return out.swapaxes(0, 1).reshape(x.shape)
