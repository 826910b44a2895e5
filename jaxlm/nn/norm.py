"""RMSNorm / LayerNorm module: holds the scale (and bias) and calls `jaxlm.ops.norms`."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.nn.param import const_param, dtype_of
from jaxlm.ops.norms import layer_norm, rms_norm


class Norm(nnx.Module):
    def __init__(self, dim: int, *, kind: str, eps: float, bias: bool, param_dtype, offset: float = 0.0, axis="embed"):
        """offset: rmsnorm multiplies by (offset + scale), scale starting at 1 - offset (Gemma: 1, 0)."""
        self.kind, self.eps, self.offset = kind, eps, offset
        self.scale = const_param((dim,), (axis,), 1.0 - offset, param_dtype)
        self.bias = const_param((dim,), (axis,), 0.0, param_dtype) if kind == "layernorm" and bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "rmsnorm":
            return rms_norm(x, self.scale[...], eps=self.eps, offset=self.offset)
        return layer_norm(x, self.scale[...], None if self.bias is None else self.bias[...], eps=self.eps)


def norm_for(cfg, dim: int | None = None, axis: str = "embed") -> Norm:
    """The norm `cfg` (a ModelConfig) asks for, over `dim` (default d_model)."""
    return Norm(
        dim or cfg.d_model,
        kind=cfg.norm,
        eps=cfg.norm_eps,
        bias=cfg.norm_bias,
        param_dtype=dtype_of(cfg.param_dtype),
        offset=cfg.norm_offset,
        axis=axis,
    )
