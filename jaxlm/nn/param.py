"""Parameter creation with logical axis names.

Every parameter records its logical axes (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `layers`) as `out_sharding` metadata; the mesh rules map
them to mesh axes in one place. Sharding is applied by the caller's jit, never
eagerly here, so models build the same with or without a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def normal_param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def const_param(shape, axes, value: float, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), out_sharding=tuple(axes), eager_sharding=False)
