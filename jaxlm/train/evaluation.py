"""Held-out evaluation: the figures of a validation pass (`evaluate`), their one-line summary, and the
evaluation of a saved run on this machine's devices (`evaluate_run`, what `jaxlm eval` prints)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlm.config import INSTRUCTION_OBJECTIVES, RL_OBJECTIVES, ConfigError, MeshConfig
from jaxlm.parallel.state import to_host
from jaxlm.train.data import load_splits, make_batches
from jaxlm.train.exact_match import exact_match
from jaxlm.train.run_dir import base_params_for, load_run
from jaxlm.train.sharded import ShardedTraining


def evaluate(eval_step, weights, batches, *, put=None) -> dict:
    """Mean loss (nats/token), perplexity and bits per byte over validation `batches`; for a loss with metric sums
    (preference objectives), the mean loss and each metric's mean per pair.

    weights: eval_step's leading arguments, (params, frozen, ref). put: host batch -> device batch (default: as is).
    """
    totals = None
    for batch in batches:
        out = eval_step(*weights, batch if put is None else put(batch))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = to_host(totals)
    count = max(float(totals.pop("count")), 1.0)
    if "bytes" not in totals:
        loss = {"val_loss": float(totals.pop("loss_sum")) / count}
        return {**loss, **{f"val_{k}": float(v) / count for k, v in totals.items()}, "val_pairs": int(count)}
    totals["count"] = count
    loss = float(totals["loss_sum"] / totals["count"])
    bpb = float(totals["loss_sum"] / (math.log(2) * max(float(totals["bytes"]), 1.0)))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb, "val_tokens": int(totals["count"])}


def describe_eval(ev: dict) -> str:
    """One line of an evaluation's figures."""
    if "val_bpb" in ev:
        return f"val loss {ev['val_loss']:.4f}, bits/byte {ev['val_bpb']:.4f}"
    accuracy = ev.get("val_accuracy", ev.get("val_rewards/accuracies"))
    margin = ev.get("val_margin", ev.get("val_rewards/margins"))
    return f"val loss {ev['val_loss']:.4f}, preference accuracy {accuracy:.1%}, margin {margin:.3f}"


def evaluate_run(run_dir: str, *, batches: int = 0, examples: int | None = None) -> dict:
    """The latest checkpoint of `run_dir` on its validation split: `evaluate`'s figures and the step, and for an
    instruction run with `examples` not None, exact match of greedy answers on its first `examples` held-out
    examples (0: all) under "exact_match". RL runs evaluate while they train: a ConfigError says where."""
    cfg, tokenizer, model, step = load_run(run_dir)
    if cfg.train.objective in RL_OBJECTIVES:
        raise ConfigError(
            f"a {cfg.train.objective} run evaluates while it trains: its held-out reward and KL are the val_reward and "
            f"val_kl lines of {run_dir}/metrics.jsonl (before the first step and every train.eval_every steps)"
        )
    _, val = load_splits(cfg, tokenizer)
    _, val_batches = make_batches(cfg, tokenizer, None, val)
    # Training's sharded evaluation on this machine's devices (the run's own mesh may not fit here).
    mesh = MeshConfig(data=math.gcd(cfg.train.batch_size, jax.device_count()))
    sharded = ShardedTraining(dataclasses.replace(cfg, mesh=mesh), mask_id=getattr(tokenizer, "mask_id", None))
    ref = base_params_for(cfg) if sharded.reference == "copy" else None  # DPO's reference: its start
    weights = sharded.place_weights(model, ref)
    eval_step = sharded.eval_step(tokenizer.token_bytes)
    out = {"step": step, **evaluate(eval_step, weights, val_batches(batches), put=lambda b: sharded.put_batch(b, lo=0))}
    if cfg.train.objective in INSTRUCTION_OBJECTIVES and examples is not None:
        held_out = val[:examples] if examples else val
        prefix_lm = cfg.train.objective == "prefix_lm"
        out["exact_match"] = exact_match(
            model, tokenizer, held_out, chat_template=cfg.data.chat_template, prefix_lm=prefix_lm
        )
    return out
