"""Training loop: data, model, jitted steps, evaluation, checkpoints, metrics.

`train(cfg)` runs or resumes the run in `cfg.train.run_dir`. SIGTERM and Ctrl-C
finish the current step, save a checkpoint and return; running the same
command again resumes bit-for-bit (same data order, PRNG and optimizer state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlm.config import ALIGNMENT_OBJECTIVES, RL_OBJECTIVES, Config, ConfigError, load_config, save_config
from jaxlm.data.chat import CHATML, CHATML_TOKENS, read_template
from jaxlm.data.tokenizer import build_tokenizer, load_tokenizer
from jaxlm.parallel.mesh import check_layout, make_mesh
from jaxlm.parallel.state import to_host
from jaxlm.train.checkpoint import Checkpointer, abstract
from jaxlm.train.data import load_splits, make_batches, reserved_ids, tokenizer_texts
from jaxlm.train.finetune import fit_head, grow_vocab, load_base, resolve
from jaxlm.train.optimizer import lr_schedule
from jaxlm.train.run_dir import RunDir, check_resumable
from jaxlm.train.sharded import ShardedTraining

log = logging.getLogger(__name__)
STEP_KEYS = ("loss", "grad_norm", "tokens", "loss_scale", "skipped", "finite")  # what every step reports


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


class _StopOnSignal(contextlib.AbstractContextManager):
    """Records SIGTERM/SIGINT so the loop can checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _prepare_tokenizer(cfg: Config, run: RunDir, resuming: bool, train_split, base=None):
    if resuming:  # the checkpoint's token ids only mean something with its own tokenizer
        tokenizer = load_tokenizer(run.tokenizer)
    elif base is not None:  # fine-tuning: the base's tokenizer, and a chat template's tokens if it lacks them
        tokenizer = base.tokenizer
        chat = any(isinstance(e, dict) and ("messages" in e or isinstance(e.get("prompt"), list)) for e in train_split)
        if chat and read_template(cfg.data.chat_template, tokenizer) == CHATML:
            missing = [t for t in CHATML_TOKENS if getattr(tokenizer, "token_id", lambda t: None)(t) is None]
            if missing and not hasattr(tokenizer, "add_special_tokens"):
                raise ConfigError(
                    "the built-in chat template needs a BPE tokenizer (data.tokenizer=byte has no special tokens)"
                )
            if missing:
                tokenizer.add_special_tokens(missing)
        if jax.process_index() == 0:
            tokenizer.save(run.tokenizer)
        _barrier("tokenizer")
    elif jax.process_index() == 0:
        tokenizer = build_tokenizer(
            cfg.data.tokenizer,
            tokenizer_texts(train_split),
            cfg.model.vocab_size - reserved_ids(cfg),
            mask=cfg.train.objective == "mlm",
        )
        tokenizer.save(run.tokenizer)
        _barrier("tokenizer")
    else:  # one process trains the tokenizer; the others read it from the shared run directory
        _barrier("tokenizer")
        tokenizer = load_tokenizer(run.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size and base is None:  # a base grows its vocabulary (grow_vocab)
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the {tokenizer.kind} "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    return tokenizer


def train(cfg: Config, *, stop_after: int | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) `cfg.train.run_dir`. `stop_after` ends early (checkpointed) at that step."""
    if cfg.train.objective in RL_OBJECTIVES:  # rollouts, rewards and updates: another loop
        from jaxlm.train.rl import train_rl

        return train_rl(cfg, stop_after=stop_after, progress=progress)
    tc = cfg.train
    run = RunDir(tc.run_dir)
    lead = jax.process_index() == 0  # writes the run directory's files; every process writes its shards
    resuming = run.has_checkpoint()
    base = None
    if cfg.finetune.init_from:  # the base's weights, tokenizer and model shape
        base = load_base(cfg.finetune.init_from)
        cfg = resolve(cfg, base.model)
        log.info("fine-tuning from %s", base.source)

    def check_resume():
        if resuming and run.config.is_file():
            # At step 0 (e.g. imported weights) no data was seen yet: only the model must match.
            sections = ("model",) if run.latest_step() == 0 else ("model", "data")
            check_resumable(load_config(run.config), cfg, sections + (("peft",) if base else ()))

    if base is None:
        check_resume()
    # A mesh that does not fit and missing data fail before the run directory is touched.
    check_layout(cfg, dict(make_mesh(cfg.mesh).shape))
    train_split, val_split = load_splits(cfg)
    if lead:
        run.path.mkdir(parents=True, exist_ok=True)
    tokenizer = _prepare_tokenizer(cfg, run, resuming, train_split, base)
    base_params = None
    if base is not None:
        cfg, base_params = grow_vocab(cfg, base.params, tokenizer.vocab_size)
        base_params = fit_head(cfg, base_params, base.model)
        if cfg.model.head != base.model.head:
            log.info("the base's read-out is dropped for a new %s head", cfg.model.head)
        check_resume()  # against the model with the tokenizer's vocabulary
    if lead:
        save_config(cfg, run.config)
    prompt_ids = tokenizer.encode(cfg.peft.prompt_init_text) if cfg.peft.prompt_init_text else None
    # checks the mesh, compiles nothing
    sharded = ShardedTraining(cfg, mask_id=getattr(tokenizer, "mask_id", None), prompt_init_ids=prompt_ids)
    log.info("%s", sharded.describe())
    loader, val_batches = make_batches(cfg, tokenizer, train_split, val_split, rows=sharded.rows)
    state = sharded.init_state(base_params)
    del base_params
    ckpt = Checkpointer(run.checkpoints, keep=tc.keep_checkpoints)
    if resuming:  # restored onto this run's mesh, whatever mesh wrote it
        params, opt_state, meta = ckpt.restore(abstract(state.params), abstract(state.opt_state))
        if ckpt.all_steps()[-1] > meta["step"]:  # newer ones were unreadable: keep them, out of the way
            ckpt.set_aside_after(meta["step"])
            _barrier("set-aside")
            ckpt.reload()
        state = sharded.restore_state(state, params, opt_state, meta["step"], meta["rng"], meta.get("loss_scale"))
        if meta.get("data") is not None:  # None: imported weights, no data seen yet
            loader.restore(meta["data"])
        log.info("resumed %s from step %d", run.path, meta["step"])
    train_step = sharded.train_step
    eval_step = sharded.eval_step(tokenizer.token_bytes)
    schedule = lr_schedule(tc)

    def save(step: int):
        scale = to_host(state.loss_scale)
        meta = {
            "step": step,
            "base": cfg.finetune.init_from or None,  # a PEFT checkpoint holds adapters for this base
            "rng": to_host(state.rng).tolist(),
            "data": loader.state(),
            "loss_scale": {
                "scale": float(scale.scale),
                "good_steps": int(scale.good_steps),
                "skipped": int(scale.skipped),
            },
        }
        ckpt.save(step, state.params, state.opt_state, meta, force=True)

    def run_eval(step: int, max_batches: int) -> dict:
        weights = (state.params, state.frozen, state.ref)
        out = evaluate(eval_step, weights, val_batches(max_batches), put=lambda b: sharded.put_batch(b, lo=0))
        out = {"step": step, **out}
        write(out)
        return out

    metrics_file = open(run.metrics, "a", encoding="utf-8") if lead else None

    def write(record: dict):
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    start = int(state.step)
    end = min(tc.steps, stop_after) if stop_after is not None else tc.steps
    tokens_per_step = tc.batch_size * cfg.data.seq_len
    bar = _progress(progress and lead, total=tc.steps, initial=start)
    last = {"time": time.perf_counter(), "step": start}
    t0 = time.perf_counter()
    evaluation, interrupted, step = {}, None, start
    pending = []  # (step, device metrics) not yet written: fetched in bulk to avoid a sync per step

    def flush(tokens_per_s: float | None = None):
        for s, m in zip([s for s, _ in pending], to_host([m for _, m in pending])):
            record = {
                "step": s,
                "loss": float(m["loss"]),
                "grad_norm": float(m["grad_norm"]),
                "lr": float(schedule(s - 1)),
            }
            if "loss_scale" in m:  # fp16: the scale this step used, and the steps skipped so far
                record.update(loss_scale=float(m["loss_scale"]), skipped=int(m["skipped"]))
            record.update({k: float(v) for k, v in m.items() if k not in STEP_KEYS})  # the objective's metrics
            write(record if tokens_per_s is None else {**record, "tokens_per_s": tokens_per_s})
        pending.clear()

    if start == 0 and tc.objective in ALIGNMENT_OBJECTIVES:  # the figures before any update, to compare with
        evaluation = run_eval(0, 0)  # the whole held-out split, as the final evaluation
        log.info("before training: %s", describe_eval(evaluation))
    with _StopOnSignal() as stopper:
        for step in range(start + 1, end + 1):
            batch = sharded.put_batch(next(loader))
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                now = time.perf_counter()
                tps = (step - last["step"]) * tokens_per_step / max(now - last["time"], 1e-9)
                last.update(time=now, step=step)
                loss = float(to_host(pending[-1][1]["loss"]))
                flush(tps)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                evaluation = run_eval(step, tc.eval_batches)
                bar.write(f"step {step}: {describe_eval(evaluation)}")
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                save(step)
            if stopper.signum is not None:
                interrupted = stopper.signum
                break
    bar.close()
    flush()  # steps ended by a signal between log points
    step = int(state.step)
    if ckpt.latest_step() != step:
        save(step)
    if step >= tc.steps and interrupted is None:
        evaluation = run_eval(step, 0)
    ckpt.close()
    if metrics_file is not None:
        metrics_file.close()
    return {"step": step, "elapsed_s": time.perf_counter() - t0, "interrupted": interrupted, **evaluation}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
