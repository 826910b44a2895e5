"""Feed-forward block: plain (GPT-2: GELU MLP with biases) or gated (LLaMA: SwiGLU)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.nn.adapters import project, projects
from jaxlm.nn.param import const_param, dtype_of, normal_param
from jaxlm.ops.dropout import fold_rows
from jaxlm.ops.mlp import gated_activation, hidden_activation


def mlp_for(cfg, hidden: int, *, out_std: float, dropout: float = 0.0, rngs: nnx.Rngs) -> MLP:
    """The feed-forward block a ModelConfig `cfg` describes, of `hidden` width (a layer's, or shared experts')."""
    return MLP(
        cfg.d_model,
        hidden,
        kind=cfg.mlp,
        act=cfg.activation,
        clamp=cfg.mlp_clamp,
        up_shift=cfg.mlp_up_shift,
        bias=cfg.mlp_bias,
        std=cfg.init_std,
        out_std=out_std,
        dropout=dropout,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        rngs=rngs,
    )


class MLP(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        kind: str,
        act: str,
        bias: bool,
        std: float,
        out_std: float,
        dropout: float = 0.0,
        clamp: float = 0.0,
        up_shift: float = 0.0,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.kind, self.act, self.dtype, self.dropout = kind, act, dtype, dropout
        self.clamp, self.up_shift = clamp, up_shift  # gated: see ops.mlp.gated_activation
        if kind == "gated":
            self.w_gate = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
            self.w_up = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
        else:
            self.w_in = normal_param(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
            self.b_in = const_param((hidden,), ("mlp",), 0.0, param_dtype) if bias else None
            self.b_out = const_param((dim,), ("embed",), 0.0, param_dtype) if bias else None
        self.w_out = normal_param(rngs, (hidden, dim), ("mlp", "embed"), out_std, param_dtype)

    def __call__(self, x: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        """(B, T, D) -> (B, T, D); dropout_keys: (B, 2) row keys for the hidden dropout (training), or None."""
        c = lambda p: None if p is None else p[...].astype(self.dtype)  # noqa: E731
        drop = dict(act=self.act, dropout_rate=self.dropout, dropout_keys=dropout_keys)
        lora_keys = fold_rows(dropout_keys, 1)  # LoRA dropout: a stream apart from the hidden dropout
        if self.kind == "gated":  # ops.mlp.gated_mlp, each projection with its LoRA
            gate, up = projects(self, ("w_gate", "w_up"), x, 1, lora_keys)
            h = gated_activation(gate, up, clamp=self.clamp, up_shift=self.up_shift, **drop)
            return project(self, "w_out", h, 1, lora_keys)
        h = hidden_activation(project(self, "w_in", x, 1, lora_keys), c(self.b_in), **drop)  # ops.mlp.mlp
        y = project(self, "w_out", h, 1, lora_keys)
        return y if self.b_out is None else y + c(self.b_out)
