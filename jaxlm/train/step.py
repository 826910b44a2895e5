"""The pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function of the
training state and a batch; the caller jits it with donated state buffers.
Gradient accumulation scans over micro-batches inside the step, so one call is
one optimizer update whatever the accumulation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.nn.moe import router_losses, router_stats
from jaxlm.ops.corruption import mlm_corrupt
from jaxlm.ops.dropout import row_keys
from jaxlm.ops.losses import masked_readout_sum, token_nll
from jaxlm.parallel.state import replicated, tree_shardings


class LossScale(NamedTuple):
    """Dynamic loss scaling (fp16): the scale, finite steps in a row, and steps skipped so far."""

    scale: jax.Array  # float32 scalar; 1 when not scaling
    good_steps: jax.Array  # int32 scalar
    skipped: jax.Array  # int32 scalar

    @staticmethod
    def create(scale: float = 1.0, good_steps: int = 0, skipped: int = 0) -> LossScale:
        return LossScale(jnp.float32(scale), jnp.int32(good_steps), jnp.int32(skipped))


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: train steps done (a skipped fp16 step counts: its batch was consumed)
    params: nnx.State  # trained parameters (float32 master weights under bf16/fp16 compute): all, or the adapters
    opt_state: Any  # optax state (of `params` only)
    rng: jax.Array  # uint32[2] PRNG key for stochastic layers and sampling
    loss_scale: LossScale  # fp16 dynamic loss scaling (inert otherwise)
    frozen: nnx.State  # the rest of the model (a PEFT method's frozen base), never differentiated; else empty
    ref: nnx.State  # the reference policy's `params` (alignment without adapters: the starting weights); else empty


# Where an alignment objective's reference policy comes from (`make_train_step(reference=...)`).
REFERENCES = ("none", "copy", "adapters_off")


def split_model(model: nnx.Module, trainable=nnx.Param):
    """(graphdef, trained state, frozen state); `nnx.merge(graphdef, params, frozen)` rebuilds the model."""
    return nnx.split(model, trainable, ...)


def init_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    seed: int,
    loss_scale: float = 1.0,
    trainable=nnx.Param,
    reference: str = "none",
) -> TrainState:
    """reference: "copy" keeps the starting `params` as the reference policy (see `REFERENCES`)."""
    _, params, frozen = split_model(model, trainable)
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        jax.random.PRNGKey(seed),
        LossScale.create(loss_scale),
        frozen,
        jax.tree.map(jnp.copy, params) if reference == "copy" else nnx.State({}),
    )


def reference_model(graphdef, params, frozen, ref, reference: str):
    """The frozen reference policy: the kept copy, or the model with its adapters off (LoRA's A and B at zero
    add nothing: the base exactly, with no second copy of it); None without one."""
    if reference == "none":
        return None
    if reference == "copy":
        return nnx.merge(graphdef, ref, frozen)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), frozen)


def train_state_shardings(abstract_state: TrainState, mesh, zero_stage: int) -> TrainState:
    """Where each part of the state lives: parameters and optimizer state per ZeRO stage; the frozen base as
    parameters (ZeRO-3 shards it over fsdp)."""
    return TrainState(
        replicated(mesh),
        tree_shardings(abstract_state.params, mesh, "params", zero_stage),
        tree_shardings(abstract_state.opt_state, mesh, "opt_state", zero_stage),
        replicated(mesh),
        LossScale(replicated(mesh), replicated(mesh), replicated(mesh)),
        tree_shardings(abstract_state.frozen, mesh, "params", zero_stage),
        tree_shardings(abstract_state.ref, mesh, "params", zero_stage),
    )


def make_objective(
    kind: str = "clm",
    *,
    mask_id: int | None = None,
    vocab_size: int = 0,
    rate: float = 0.15,
    layer_runner: Callable | None = None,
):
    """objective(model, batch, key, dropout_keys) -> (final hidden states (B, T, D), targets, loss mask or None);
    the loss reads them out through `model.readout` (a chunk of positions at a time with `model.logits_chunk`).

    layer_runner: runs a single-stack model's layers (the pipeline schedule; see `jaxlm.nn.stack.Stack`).

    key: noise for the objective (mlm corruption); dropout_keys: (B, 2) row keys, or None (no dropout).

    clm: predict batch["targets"] (the next tokens) from batch["inputs"].
    sft: the same on instruction batches: batch["mask"] scores only the responses.
    prefix_lm: sft whose prompts (batch["prefix"]) attend bidirectionally.
    mlm: corrupt batch["inputs"] (BERT: 80/10/10) and predict the picked originals.
    span, seq2seq: encoder-decoder batches from `jaxlm.data.seq2seq` (corrupted on the host).
    """
    if kind in ("clm", "sft", "prefix_lm"):

        def clm(model, batch, key, dropout_keys=None):
            # Packed documents or examples (`jaxlm.data.instructions`) carry positions that restart per example,
            # segment ids, and for prefix_lm the prompt tokens (attended bidirectionally).
            x, _ = model.hidden(
                batch["inputs"],
                batch.get("positions"),
                batch.get("valid"),
                segments=batch.get("segments"),
                prefix=batch.get("prefix") if kind == "prefix_lm" else None,
                dropout_keys=dropout_keys,
                layer_runner=layer_runner,
            )
            return x, batch["targets"], batch.get("mask")

        return clm
    if kind == "mlm":
        if mask_id is None:
            raise ConfigError("train.objective=mlm needs a tokenizer with a [MASK] token")

        def mlm(model, batch, key, dropout_keys=None):
            tokens, valid = batch["inputs"], batch.get("mask")
            corrupted, picked = mlm_corrupt(key, tokens, mask_id=mask_id, vocab_size=vocab_size, rate=rate, valid=valid)
            x, _ = model.hidden(corrupted, valid=valid, dropout_keys=dropout_keys, layer_runner=layer_runner)
            return x, tokens, picked

        return mlm
    if kind in ("span", "seq2seq"):

        def seq2seq(model, batch, key, dropout_keys=None):  # teacher forcing: tgt_in is tgt_out shifted right
            x = model.hidden(batch["src"], batch["tgt_in"], batch["src_mask"], batch["tgt_mask"], dropout_keys)
            return x, batch["tgt_out"], batch["tgt_mask"]

        return seq2seq
    raise ConfigError(f"unknown train.objective {kind!r}")


def lm_loss(objective, z_loss: float = 0.0):
    """The loss of a language-model objective (`make_objective`): summed token cross-entropy, token count."""

    def loss(model, reference, batch, key, dropout_keys=None):
        x, targets, mask = objective(model, batch, key, dropout_keys)
        nll = functools.partial(model.readout, functools.partial(token_nll, z_loss=z_loss))
        return (*masked_readout_sum(nll, x, targets, mask), {})

    return loss


LOAD = "_moe_load"  # the experts' loads, carried with the metric sums (not a metric)


def balance_router(params, load: jax.Array, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: each expert's selection bias (`router_balance`, (layers,
    E)) moves by rate towards balance, + for an expert below its layer's mean load, - above it."""

    def move(path, leaf):
        if "router_balance" in jax.tree_util.keystr(path) and leaf.shape == load.shape:
            return leaf + (rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(move, params)


def _positions(batch: dict) -> int:
    """Token positions in a (micro-)batch: the largest array's size, a constant of the shapes."""
    return max(x.size for x in jax.tree.leaves(batch))


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    z_loss: float = 0.0,
    grad_shardings=None,
    objective=None,
    loss=None,
    reference: str = "none",
    dropout: bool = False,
    loss_scale_window: int | None = None,
):
    """Returns train_step(state, batch); batch arrays are (batch, ...) with batch % grad_accum == 0.

    grad_shardings: where gradients live while they are accumulated (ZeRO-2 and -3
    shard them, which turns the data-parallel all-reduce into a reduce-scatter).
    objective: from `make_objective` (default: next-token prediction), trained with `lm_loss`.
    loss: instead of an objective, loss(model, reference model, batch, key, dropout_keys) -> (loss_sum, count,
    metric sums): the step minimizes sum / count over the whole batch and reports each metric sum / count.
    reference: where the reference model comes from (`REFERENCES`; alignment objectives).
    dropout: draw dropout masks (the model's rates): one key per row of the whole batch, so
    gradient accumulation and the mesh layout do not change them.
    loss_scale_window: dynamic loss scaling (fp16) when set: the loss is multiplied by
    `state.loss_scale.scale` before differentiation and the gradients divided by it; a step whose
    gradients are not all finite leaves parameters and optimizer state as they were and halves the
    scale; after this many finite steps in a row the scale doubles.
    """
    loss = loss or lm_loss(objective or make_objective("clm"), z_loss)
    place = (lambda g: g) if grad_shardings is None else (lambda g: jax.lax.with_sharding_constraint(g, grad_shardings))

    scaling = loss_scale_window is not None

    def grads_of(state, micro, key, dropout_keys, scale):
        ref = reference_model(graphdef, state.params, state.frozen, state.ref, reference)

        def f(p):
            model = nnx.merge(graphdef, p, state.frozen)
            with router_stats() as found:  # mixture of experts: the routers' losses, per token
                loss_sum, count, sums = loss(model, ref, micro, key, dropout_keys)
            if found:
                penalty, moe = router_losses(found, model.cfg)
                loss_sum = loss_sum + penalty * count
                sums = {**sums, **{k: v * count for k, v in moe.items()}}
                if model.cfg.router_balance_rate:  # the experts' loads (layers, E) of the model's one stack
                    sums[LOAD] = found[0]["load"].astype(jnp.float32)
            # The scale applies to the per-token mean (as torch's GradScaler's does), not to the sum.
            return loss_sum * (scale / _positions(micro)) if scaling else loss_sum, (loss_sum, count, sums)

        (_, (loss_sum, count, sums)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        return grads, loss_sum, count, sums

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Micro-batch i = rows i, i + grad_accum, ...: strided, so each one spans every data shard.
        split = lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
        micro = jax.tree.map(split, batch)
        rows = jax.tree.leaves(batch)[0].shape[0]
        drop_keys = split(row_keys(jax.random.fold_in(state.rng, 2), rows)) if dropout else None

        scale = state.loss_scale.scale

        def body(carry, mb_key):
            g, ls, c, sums = grads_of(state, *mb_key, scale)
            return jax.tree.map(jnp.add, carry, (place(g), ls, c, sums)), None

        keys = jax.random.split(jax.random.fold_in(state.rng, 1), grad_accum)  # corruption noise per micro-batch
        first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731
        if grad_accum == 1:  # no loop: XLA schedules and fuses across the whole step
            grads, loss_sum, count, sums = grads_of(state, first(micro), keys[0], first(drop_keys), scale)
            grads = place(grads)
        else:
            shapes = jax.eval_shape(lambda: grads_of(state, first(micro), keys[0], first(drop_keys), scale))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            zeros = (place(zeros[0]), *zeros[1:])
            (grads, loss_sum, count, sums), _ = jax.lax.scan(body, zeros, (micro, keys, drop_keys))
        # Gradient of the mean over every token of every micro-batch (and unscaled).
        unscale = count * scale / _positions(first(micro)) if scaling else count
        grads = jax.tree.map(lambda g: g / unscale, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = sums.pop(LOAD, None)
        if load is not None:
            rate = nnx.merge(graphdef, state.params, state.frozen).cfg.router_balance_rate
            params = balance_router(params, load, rate)
        rng, _ = jax.random.split(state.rng)
        grad_norm = optax.global_norm(grads)
        metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "tokens": count}
        metrics.update({k: v / count for k, v in sums.items()})
        loss_scale = state.loss_scale
        if scaling:
            finite = jnp.isfinite(grad_norm)  # any inf/nan gradient makes the norm non-finite
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            good = jnp.where(finite, loss_scale.good_steps + 1, 0)
            grow = good >= loss_scale_window
            loss_scale = LossScale(
                jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0)),
                jnp.where(grow, 0, good).astype(jnp.int32),
                loss_scale.skipped + (~finite).astype(jnp.int32),
            )
            metrics.update(loss_scale=scale, skipped=loss_scale.skipped, finite=finite)
        return TrainState(state.step + 1, params, opt_state, rng, loss_scale, state.frozen, state.ref), metrics

    return train_step


def make_eval_step(graphdef, token_bytes: jax.Array, objective=None, *, loss=None, reference: str = "none"):
    """eval_step(params, frozen, ref, batch) -> {"loss_sum", "count", "bytes"}; bytes are the scored targets'
    UTF-8 lengths. params, frozen, ref: as in `TrainState`. With `loss` (see `make_train_step`):
    {"loss_sum", "count", and the loss's metric sums}.

    Corruption (mlm) uses a fixed key, so evaluations are comparable across steps.
    """
    if loss is not None:

        def eval_loss(params, frozen, ref, batch):
            model, ref_model = (
                nnx.merge(graphdef, params, frozen),
                reference_model(graphdef, params, frozen, ref, reference),
            )
            loss_sum, count, sums = loss(model, ref_model, batch, jax.random.PRNGKey(0))
            return {"loss_sum": loss_sum, "count": count, **sums}

        return eval_loss
    objective = objective or make_objective("clm")

    def eval_step(params, frozen, ref, batch):
        model = nnx.merge(graphdef, params, frozen)
        x, targets, mask = objective(model, batch, jax.random.PRNGKey(0))
        loss_sum, count = masked_readout_sum(functools.partial(model.readout, token_nll), x, targets, mask)
        mask = jnp.ones_like(targets, bool) if mask is None else mask
        nbytes = jnp.sum(jnp.where(mask, token_bytes[targets], 0))
        return {"loss_sum": loss_sum, "count": count, "bytes": nbytes.astype(jnp.float32)}

    return eval_step
