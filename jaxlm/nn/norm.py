"""RMSNorm / LayerNorm module: holds the scale (and bias) and calls `jaxlm.ops.norms`."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.nn.param import const_param
from jaxlm.ops.norms import layer_norm, rms_norm


class Norm(nnx.Module):
    def __init__(self, dim: int, *, kind: str, eps: float, bias: bool, param_dtype):
        self.kind = kind
        self.eps = eps
        self.scale = const_param((dim,), ("embed",), 1.0, param_dtype)
        self.bias = const_param((dim,), ("embed",), 0.0, param_dtype) if kind == "layernorm" and bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "rmsnorm":
            return rms_norm(x, self.scale[...], eps=self.eps)
        return layer_norm(x, self.scale[...], None if self.bias is None else self.bias[...], eps=self.eps)
