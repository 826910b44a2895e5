"""Logical axis names -> mesh axes: the one table of sharding rules.

Parameters carry logical axis names (see `jaxlm/nn/param.py`), activations get
them at `constrain(x, axes)` calls. This table maps both to the mesh axes
`pipeline`, `data`, `fsdp`, `context`, `expert`, `tensor` (MaxText's logical-axis-rules idea, with a
dozen names). What is sharded over `fsdp` follows the ZeRO stage (DeepSpeed's
meanings): stage 1 shards the optimizer state, 2 also the gradients, 3 also the
parameters. Activations never split `embed`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError

# The mesh axes that split the batch: expert parallelism's devices are data-parallel outside the experts.
BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "layers": ("pipeline",),
    "stages": ("pipeline",),
    # parameter state only, per ZeRO stage; the devices of the expert axis (data-parallel outside the experts) and
    # of the context axis (the same rows, other tokens) hold the same parameters: they shard them as FSDP does
    "embed": ("fsdp", "context", "expert"),
    "vocab": ("tensor",),  # vocabulary-parallel embedding and logits
    "heads": ("tensor",),  # Megatron: attention column-parallel in, row-parallel out
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),  # Megatron: MLP column-parallel in, row-parallel out
    "experts": ("expert",),  # a mixture of experts' expert index: expert parallelism
    "head_dim": (),
    "seq": ("context",),  # context parallelism: activations split along the sequence
    "lora": (),  # a LoRA's rank: small, replicated
    "q_lora": (),  # latent attention's query and key/value ranks: small, replicated
    "kv_lora": (),
}

# With fewer KV heads than tensor ranks (GQA), each rank keeps every K/V head
# (Megatron replicates them) instead of failing.
REPLICATE_IF_UNEVEN = frozenset({"kv_heads"})

KINDS = ("params", "grads", "opt_state", "activations")


def rules_for(kind: str, zero_stage: int) -> dict[str, tuple[str, ...]]:
    """The rules for parameters, gradients, optimizer state or activations under `zero_stage`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shard_embed = {"params": zero_stage >= 3, "grads": zero_stage >= 2, "opt_state": zero_stage >= 1}.get(kind, False)
    return RULES if shard_embed else {**RULES, "embed": ()}


def logical_to_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    rules: dict[str, tuple[str, ...]],
    mesh_shape: dict[str, int],
    *,
    where: str = "array",
    strict: bool = True,
) -> P:
    """PartitionSpec for an array with logical `axes` and `shape` on a mesh of `mesh_shape`.

    Mesh axes of size 1 are left out. A dimension that a mesh axis would split
    unevenly raises ConfigError (strict) or stays unsplit (hints: strict=False).
    """
    if len(axes) != len(shape):
        raise ValueError(f"{where}: {len(axes)} axis names {axes} for shape {shape}")
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"{where}: logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in rules[name] if mesh_shape.get(a, 1) > 1 and a not in used)
        n = math.prod(mesh_shape[a] for a in mesh_axes)
        if n > 1 and dim % n:
            if strict and name not in REPLICATE_IF_UNEVEN:
                sizes = " x ".join(f"{a}={mesh_shape[a]}" for a in mesh_axes)
                raise ConfigError(
                    f"{where}: dimension {name!r} of size {dim} does not split evenly over mesh {sizes}; "
                    f"change the model size or the mesh"
                )
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


# The mesh and activation rules that `constrain` uses while a sharded step is traced.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxlm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None):
    """Within this context, `constrain` adds sharding constraints for `mesh` (None: none)."""
    token = _ACTIVE.set(mesh)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> jax.sharding.Mesh | None:
    return _ACTIVE.get()


def context_size() -> int:
    """The size of the active mesh's `context` axis (context parallelism), 1 without a mesh."""
    mesh = _ACTIVE.get()
    return 1 if mesh is None else dict(mesh.shape).get("context", 1)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Hints XLA to lay `x` out by logical `axes`; identity when no mesh is active."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, x.shape, rules_for("activations", 0), dict(mesh.shape), strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
