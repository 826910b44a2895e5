"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jaxlm.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


# Stacking axes: a stacked layer's norm scale (layers, D) or an expert's bias (layers, experts, F) is still a vector.
STACKING_AXES = ("layers", "experts")


def decays(p) -> bool:
    """Whether weight decay applies to parameter `p`: a matrix, counting its logical axes without the stacking
    ones (an nnx Variable's `out_sharding`), else its dimensions."""
    axes = p.get_metadata().get("out_sharding") if isinstance(p, nnx.Variable) else None
    if axes is None:
        return jax.numpy.ndim(p) >= 2
    return len([a for a in axes if a not in STACKING_AXES]) >= 2


def decay_mask(params):
    """The weight-decay mask of a parameter tree (nnx State or plain arrays), in its structure."""
    variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v: v.replace(decays(v)) if variable(v) else decays(v), params, is_leaf=variable)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Weight decay applies to matrices only (not norms, biases, stacked or not), as in GPT-2/LLaMA recipes."""
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
