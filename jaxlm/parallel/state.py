"""Shardings of the training state and batches, and host <-> global array moves.

Parameters, gradients and optimizer moments are `nnx.Variable`s that carry
their logical axes, so one function places all three (per ZeRO stage); other
leaves (step, PRNG key, optimizer counts) are replicated. Batches are split
over `data` x `fsdp` by rows. Every process builds only the rows its devices
hold, and reads replicated results from its own devices, so the same code runs
on one host or many.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.axes import BATCH_AXES, logical_to_spec, rules_for


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def path_name(path) -> str:
    """A pytree key path as slash-joined names (`stack/layers/attn/wq/value`)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(tree, mesh: Mesh, kind: str, zero_stage: int):
    """NamedSharding per leaf (a pytree prefix of `tree`): Variables by logical axes, the rest replicated.

    kind: "params" | "grads" | "opt_state" (the ZeRO stage decides which of them split `embed`).
    """
    rules, shape = rules_for(kind, zero_stage), dict(mesh.shape)

    def one(path, leaf):
        if _is_variable(leaf):
            axes = leaf.get_metadata()["out_sharding"]
            return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, rules, shape, where=path_name(path)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(B, ...) arrays with rows split over data x fsdp x expert."""
    return NamedSharding(mesh, P(BATCH_AXES))


def local_rows(sharding: NamedSharding, global_rows: int) -> tuple[int, int]:
    """The [lo, hi) rows of a (global_rows, ...) batch that this process's devices hold."""
    slices = sharding.addressable_devices_indices_map((global_rows,)).values()
    starts = [s[0].start or 0 for s in slices]
    stops = [global_rows if s[0].stop is None else s[0].stop for s in slices]
    return min(starts), max(stops)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int, lo: int = 0) -> dict:
    """Host rows [lo, lo + len) of a global (global_rows, ...) batch -> sharded jax.Arrays."""

    def put(a):
        shape = (global_rows, *a.shape[1:])

        def shard(index):
            rows = index[0]
            start = (rows.start or 0) - lo
            stop = (global_rows if rows.stop is None else rows.stop) - lo
            return a[(slice(start, stop), *index[1:])]

        return jax.make_array_from_callback(shape, sharding, shard)

    return {k: put(v) for k, v in batch.items()}


def to_host(tree):
    """Replicated (or fully addressable) arrays -> NumPy, without cross-process gathers."""

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)
