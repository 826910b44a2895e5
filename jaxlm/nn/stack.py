"""Running a stack of layers whose parameters are stacked along a leading `layers` axis.

`stacked(make, n, rngs)` builds n copies of a module with one `nnx.vmap`, so
every parameter gains the `layers` axis. `run_stack` applies them by
`lax.scan` (one layer compiled once) or a Python loop, optionally
rematerialising each layer (gradient checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "full": None,  # save only each layer's input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, redo attention
}


def layer_ids(num: int) -> jax.Array:
    """(L,) uint32 layer indices, scanned with the layers: layer i folds its dropout keys with i."""
    return jnp.arange(num, dtype=jnp.uint32)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of `make(rngs)`, parameters stacked on axis 0 (`layers`)."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(key):
        return make(nnx.Rngs(params=key))

    return build(jax.random.split(rngs.params(), num))


def run_stack(layer: Callable, params, x: jax.Array, per_layer=None, *, remat: str = "none", scan: bool = True):
    """x through the stacked layers.

    Args:
      layer: (x, params_i, per_layer_i) -> (x, out_i).
      params: pytree of (L, ...) stacked parameters.
      per_layer: pytree of (L, ...) per-layer inputs (e.g. KV caches), or None.

    Returns:
      (x, outs stacked (L, ...)) .
    """
    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(lambda x, a: layer(x, *a), x, (params, per_layer))
    outs = []
    for i in range(jax.tree.leaves(params)[0].shape[0]):
        at = lambda a, i=i: a[i]  # noqa: E731
        x, out = layer(x, jax.tree.map(at, params), jax.tree.map(at, per_layer))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs and outs[0] is not None else None
