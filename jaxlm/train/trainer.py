"""Training on batches (pretraining, SFT, preference and reward training): the step and the evaluation.

`train(cfg)` runs or resumes the run in `cfg.train.run_dir` (RL objectives go to `jaxlm.train.rl`); the
session (`jaxlm.train.session`) does the rest: SIGTERM and Ctrl-C finish the current step, save a checkpoint
and return; running the same command again resumes bit-for-bit (same data order, PRNG and optimizer state).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxlm.config import ALIGNMENT_OBJECTIVES, RL_OBJECTIVES, Config
from jaxlm.train.data import make_batches
from jaxlm.train.evaluation import describe_eval, evaluate
from jaxlm.train.optimizer import lr_schedule
from jaxlm.train.rl import train_rl
from jaxlm.train.run_dir import RunDir
from jaxlm.train.session import Session

STEP_KEYS = ("loss", "grad_norm", "tokens", "loss_scale", "skipped", "finite")  # what every step reports


def train(cfg: Config, *, stop_after: int | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) `cfg.train.run_dir`. `stop_after` ends early (checkpointed) at that step."""
    if cfg.train.objective in RL_OBJECTIVES:  # rollouts, rewards and updates: another step
        return train_rl(cfg, stop_after=stop_after, progress=progress)
    with Session(cfg, progress=progress) as session:
        cfg, tokenizer = session.cfg, session.tokenizer
        tc = cfg.train
        prompt_ids = tokenizer.encode(cfg.peft.prompt_init_text) if cfg.peft.prompt_init_text else None
        sharded = session.build(mask_id=getattr(tokenizer, "mask_id", None), prompt_init_ids=prompt_ids)
        loader, val_batches = make_batches(cfg, tokenizer, session.train_split, session.val_split, rows=sharded.rows)
        session.restore(loader)
        consumed = getattr(loader, "consumed", None)
        eval_step = sharded.eval_step(tokenizer.token_bytes)
        schedule = lr_schedule(tc)

        def step(s: int) -> dict:
            session.state, m = sharded.train_step(session.state, sharded.put_batch(next(loader)))
            record = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": schedule(s - 1)}
            if "loss_scale" in m:  # fp16: the scale this step used, and the steps skipped so far
                record.update(loss_scale=m["loss_scale"], skipped=m["skipped"])
            if consumed is not None:  # a mixture: tokens and epochs of each source so far
                record |= consumed(s)
            return record | {k: v for k, v in m.items() if k not in STEP_KEYS}  # the objective's metrics

        def held_out(s: int, whole: bool) -> dict:
            state = session.state
            return evaluate(
                eval_step,
                (state.params, state.frozen, state.ref),
                val_batches(0 if whole else tc.eval_batches),
                put=lambda b: sharded.put_batch(b, lo=0),
            )

        return session.run(
            step,
            held_out,
            stop_after=stop_after,
            evaluate_first=tc.objective in ALIGNMENT_OBJECTIVES,  # the figures before any update, to compare with
            tokens_per_step=tc.batch_size * cfg.data.seq_len,
            describe=describe_eval,
        )


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
