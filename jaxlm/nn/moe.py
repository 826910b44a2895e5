"""Mixture-of-experts feed-forward block (Mixtral, Qwen-MoE): a router picks k of E expert MLPs per token,
plus optional shared experts every token passes through; and the collection of the routers' statistics.

Expert weights are stacked on a leading `experts` axis: gated (E, D, F) gate and up and (E, F, D) out, or
plain (E, D, F) in. The router's logits, scores and weights are float32.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import active_mesh
from jaxlm.config import ModelConfig
from jaxlm.nn.mlp import mlp_for
from jaxlm.nn.param import const_param, normal_param
from jaxlm.ops.dense import dense
from jaxlm.ops.moe import expert_counts, expert_mlp, load_balancing_loss, route, router_z_loss
from jaxlm.parallel.experts import expert_parallel_mlp


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, std: float, out_std: float, dtype, param_dtype, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_hidden
        self.cfg, self.dtype = cfg, dtype
        self.router = normal_param(rngs, (D, E), ("embed", None), std, param_dtype)
        self.router_bias = const_param((E,), (None,), 0.0, param_dtype) if cfg.router_bias else None
        # Not trained by gradients (used through stop_gradient, a vector: no weight decay); moved by the balance
        # rule of the train step (`balance_router`).
        self.router_balance = const_param((E,), (None,), 0.0, param_dtype) if cfg.router_balance else None
        names = ("w_gate", "w_up") if cfg.mlp == "gated" else ("w_in",)
        for name in names:
            setattr(self, name, normal_param(rngs, (E, D, F), ("experts", "embed", "mlp"), std, param_dtype))
        self.w_out = normal_param(rngs, (E, F, D), ("experts", "mlp", "embed"), out_std, param_dtype)
        bias = lambda n: const_param((E, n), ("experts", "mlp" if n == F else "embed"), 0.0, param_dtype)  # noqa: E731
        for name in names:  # b_gate, b_up / b_in
            setattr(self, "b" + name[1:], bias(F) if cfg.mlp_bias else None)
        self.b_out = bias(D) if cfg.mlp_bias else None
        self.shared = mlp_for(cfg, cfg.shared_experts * F, out_std=out_std, rngs=rngs) if cfg.shared_experts else None
        self.shared_gate = (
            normal_param(rngs, (D, 1), ("embed", None), std, param_dtype) if cfg.shared_expert_gate else None
        )

    def __call__(
        self, x: jax.Array, dropout_keys: jax.Array | None = None, *, dropless: bool = False
    ) -> tuple[jax.Array, dict]:
        """(B, T, D) -> (B, T, D), and this layer's router statistics (`router_stats`).

        dropless: ignore `capacity_factor` (decoding: a row's output must not depend on the other rows')."""
        cfg = self.cfg
        c = lambda p: p[...].astype(self.dtype)  # noqa: E731
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)
        logits = dense(tokens.astype(jnp.float32), self.router[...].astype(jnp.float32))  # MD,DE->ME
        if self.router_bias is not None:
            logits = logits + self.router_bias[...].astype(jnp.float32)
        balance = None if self.router_balance is None else jax.lax.stop_gradient(self.router_balance[...])
        routing = route(
            logits,
            cfg.experts_per_token,
            score=cfg.router,
            normalize=cfg.router_normalize,
            scale=cfg.router_scale,
            bias=balance,
            groups=cfg.router_groups or 1,
            group_limit=cfg.router_group_limit,
        )
        gated = cfg.mlp == "gated"
        w_in = (c(self.w_gate), c(self.w_up)) if gated else c(self.w_in)
        # per-expert LoRA (A, B, scale) pairs of the expert weights, when adapted and not merged
        pair = lambda n: lora.pair(self.dtype) if (lora := getattr(self, "lora_" + n, None)) else None  # noqa: E731
        pairs_in = (pair("w_gate"), pair("w_up")) if gated else pair("w_in")
        adapted = [p for p in (*(pairs_in if gated else [pairs_in]), pair("w_out")) if p is not None]
        loras = (pairs_in, pair("w_out")) if adapted else None
        b_in = None
        if self.b_out is not None:
            b_in = (c(self.b_gate), c(self.b_up)) if gated else c(self.b_in)
        experts = dict(
            loras=loras,
            b_in=b_in,
            b_out=None if self.b_out is None else c(self.b_out),
            act=cfg.activation,
            clamp=cfg.mlp_clamp,
            up_shift=cfg.mlp_up_shift,
            capacity_factor=0.0 if dropless else cfg.capacity_factor,
            impl=cfg.expert_impl,
        )
        mesh = active_mesh()
        if mesh is not None and mesh.shape.get("expert", 1) > 1:  # expert parallelism: all-to-all dispatch
            y, dropped = expert_parallel_mlp(tokens, routing, w_in, c(self.w_out), mesh=mesh, **experts)
        else:
            y, layout = expert_mlp(tokens, routing, w_in, c(self.w_out), **experts)
            dropped = layout.dropped
        y = y.reshape(B, T, D)
        if self.shared is not None:
            shared = self.shared(x, dropout_keys)
            if self.shared_gate is not None:
                shared = shared * jax.nn.sigmoid(dense(x, c(self.shared_gate)))  # BTD,DO->BTO
            y = y + shared
        stats = {
            "aux_loss": load_balancing_loss(routing.probs, routing.experts),
            "z_loss": router_z_loss(routing.logits),
            "load": expert_counts(routing.experts, cfg.num_experts),
            "dropped": dropped,
        }
        return y, stats


# The routers' statistics of the forward passes traced inside `router_stats()`.
_STATS: contextvars.ContextVar = contextvars.ContextVar("jaxlm_router_stats", default=None)


@contextlib.contextmanager
def router_stats():
    """Collects the router statistics of every model call traced within: yields a list that each layer stack
    with experts appends its stacked statistics to ({"aux_loss", "z_loss", "dropped": (L,), "load": (L, E)})."""
    found: list = []
    token = _STATS.set(found)
    try:
        yield found
    finally:
        _STATS.reset(token)


def record(stats: dict | None) -> None:
    """Hands a layer stack's statistics to the enclosing `router_stats()`, if any."""
    found = _STATS.get()
    if found is not None and stats is not None:
        found.append(stats)


def router_losses(found: list, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """(the weighted auxiliary loss per token, metrics) from `router_stats()`'s list: each loss averaged over
    the layers with experts (and over the model calls)."""
    if not found:
        return jnp.float32(0.0), {}
    mean = lambda key: jnp.mean(jnp.concatenate([jnp.ravel(s[key]) for s in found]))  # noqa: E731
    aux, z = mean("aux_loss"), mean("z_loss")
    load = jnp.concatenate([s["load"] for s in found]).astype(jnp.float32)  # (layers, E)
    imbalance = jnp.mean(jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9))
    dropped = jnp.sum(jnp.concatenate([jnp.ravel(s["dropped"]) for s in found])) / jnp.maximum(jnp.sum(load), 1.0)
    metrics = {"moe_aux_loss": aux, "moe_z_loss": z, "moe_imbalance": imbalance, "moe_dropped": dropped}
    return cfg.aux_loss_weight * aux + cfg.router_z_loss_weight * z, metrics
