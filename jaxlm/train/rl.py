"""Reinforcement learning from a reward: PPO (InstructGPT's RLHF) and GRPO, on one device or a mesh.

One step of `train.steps` is one rollout batch:
  1. `train.batch_size` prompts (x `align.group` samples each for GRPO) are answered by the policy with the
     KV-cache generator, sampling at `align.temperature`, up to `align.response_len` tokens (end-of-text, or a
     chat template's end-of-turn, ends a response and is part of it);
  2. the reward scores each response: a reward-model run (its score of prompt + response) or a Python function;
  3. one forward pass gives the policy's log-probs (and PPO's values) and the reference's log-probs;
     PPO: per-token rewards −kl_coef·KL (estimator `align.kl_estimator`, k1 by default) plus the score at the
     last token, GAE(γ, λ) advantages, whitened; GRPO: each sample's reward against its group's;
  4. `align.epochs` passes of `align.minibatches` optimizer updates each over the rollout batch (the compiled,
     sharded train step; the clipped losses of `jaxlm.train.policy_gradient`).
The reference is the starting policy: a kept copy, or with LoRA the same weights with the adapters off.
A reward function that raises or returns a non-finite value skips its step (no update, a warning that says
why, `skipped` in metrics.jsonl); if the first three steps all fail, training stops with the error.
Held-out prompts are answered at each evaluation (and before the first step): mean reward and KL.
Runs are checkpointed and resume exactly (rollouts are seeded by the step); one process (any mesh of its
devices).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import RL_OBJECTIVES, Config, ConfigError, load_config, save_config
from jaxlm.data.chat import CHATML_TOKENS, read_template
from jaxlm.data.instructions import RowLoader
from jaxlm.data.prompts import encode_prompt, prompt_messages, reward_fields
from jaxlm.data.tokenizer import same_vocabulary
from jaxlm.errors import DataError
from jaxlm.generate import Generator
from jaxlm.ops.rl import group_advantages
from jaxlm.parallel.mesh import check_layout, make_mesh
from jaxlm.parallel.state import to_host
from jaxlm.train.checkpoint import Checkpointer, abstract
from jaxlm.train.data import load_splits
from jaxlm.train.finetune import fit_head, grow_vocab, load_base, resolve
from jaxlm.train.policy_gradient import explained_variance, make_scorer, ppo_advantages
from jaxlm.train.run_dir import RunDir, check_resumable
from jaxlm.train.sharded import ShardedTraining, on_mesh

log = logging.getLogger(__name__)
FAILED_STARTS = 3  # a reward that fails on this many first steps in a row is broken, not flaky


def step_config(cfg: Config) -> Config:
    """The config of the compiled update: a batch is one minibatch of rollouts, a step one optimizer update."""
    tc, ac = cfg.train, cfg.align
    updates = ac.epochs * ac.minibatches
    rows = tc.batch_size * ac.group // ac.minibatches
    train = dataclasses.replace(tc, batch_size=rows, steps=tc.steps * updates, warmup_steps=tc.warmup_steps * updates)
    return dataclasses.replace(cfg, train=train)


# ---------------------------------------------------------------------------------------------------- rewards


class RewardFailed(Exception):
    """align.reward raised or returned something unusable: the one failure a step is skipped for (sampling,
    scoring and updates are jaxlm's own code, and their errors stop the run)."""


class Reward:
    """score(prompts, completions, fields, tokens) -> (B,) float64: a Python function or a reward-model run."""

    def __init__(self, spec: str, tokenizer):
        self.spec = spec
        path = Path(spec).expanduser()
        if path.is_dir():
            self._model_init(path, tokenizer)
        elif ":" in spec:
            module, _, name = spec.partition(":")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"align.reward {spec!r}: cannot import {name} from {module}: {e}") from None
            if not callable(fn):
                raise ConfigError(f"align.reward {spec!r} is not a function")
            self.fn, self.model = fn, None
        else:
            raise ConfigError(
                f"align.reward {spec!r} is neither a run directory nor module:function (e.g. jaxlm.rewards:passage_answer)"
            )

    def _model_init(self, path: Path, tokenizer):
        from jaxlm.train.preference import reward_scores
        from jaxlm.train.run_dir import load_run

        cfg, rm_tokenizer, model, _ = load_run(path)
        if cfg.model.head != "score":
            raise ConfigError(f"align.reward {path} is not a reward model (its model.head is {cfg.model.head})")
        if not same_vocabulary(rm_tokenizer, tokenizer):
            raise ConfigError(
                f"align.reward {path} reads another tokenizer ({rm_tokenizer.vocab_size} tokens; the policy's has "
                f"{tokenizer.vocab_size}, or the same number with other ids): train the reward model from the "
                "policy's base"
            )
        self.fn, self.model = None, model
        graphdef, params = nnx.split(model)
        self._params = params
        self._score = jax.jit(lambda p, t, v: reward_scores(nnx.merge(graphdef, p), t, v))

    def __call__(self, prompts, completions, fields, tokens, valid) -> np.ndarray:
        if self.model is not None:
            out = np.asarray(jax.device_get(self._score(self._params, tokens, valid)), np.float64)
        else:
            try:  # the user's function: whatever it raises or returns wrong is its failure (RewardFailed)
                out = np.asarray(list(self.fn(prompts=prompts, completions=completions, **fields)), np.float64)
            except Exception as e:
                raise RewardFailed(f"{type(e).__name__}: {e}") from e
            if out.shape != (len(completions),):
                raise RewardFailed(
                    f"returned {out.shape[0] if out.ndim else 'a scalar'} values for {len(completions)} completions"
                )
        if not np.all(np.isfinite(out)):
            raise RewardFailed(f"returned a non-finite reward ({int(np.sum(~np.isfinite(out)))} of {len(out)})")
        return out


# --------------------------------------------------------------------------------------------------- rollouts


class Rollouts:
    """Samples responses to prompts with the policy and lays them out as training rows."""

    def __init__(self, cfg: Config, tokenizer, sharded: ShardedTraining):
        self.cfg, self.tokenizer, self.sharded = cfg, tokenizer, sharded
        ac = cfg.align
        self.T, self.R = cfg.data.seq_len, ac.response_len
        ids = getattr(tokenizer, "token_id", lambda _: None)
        self.stops = {tokenizer.eos_id} | ({i} if (i := ids(CHATML_TOKENS[1])) is not None else set())  # end of turn
        self.generator = None
        self.sampling = dict(temperature=ac.temperature, top_k=ac.top_k, top_p=ac.top_p)

    def sample(self, state, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Responses, each cut after its first stop token (kept: stopping is an action)."""
        model = nnx.merge(self.sharded.graphdef, state.params, state.frozen)
        if self.generator is None:
            self.generator = Generator(model)
        else:  # the same model with new weights: no recompilation
            self.generator.params = nnx.state(model)
        outs = self.generator.generate(
            prompts, max_new_tokens=self.R, seed=seed, eos_id=self.tokenizer.eos_id, **self.sampling
        )
        responses = []
        for out in outs:
            cut = next((k for k, t in enumerate(out) if t in self.stops), None)
            if cut is not None:
                out = out[: cut + 1]
            elif len(out) < self.R:  # the generator stopped at end-of-text, which it leaves out
                out = [*out, self.tokenizer.eos_id]
            responses.append(out[: self.R])
        return responses

    def rows(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, np.ndarray]:
        """tokens, valid (B, T); response (B, T-1): targets that are response tokens; reward_valid (B, T): the
        sequence without its stop token (what a reward model scores)."""
        B, T = len(prompts), self.T
        out = {
            "tokens": np.zeros((B, T), np.int32),
            "valid": np.zeros((B, T), bool),
            "response": np.zeros((B, T - 1), bool),
            "reward_valid": np.zeros((B, T), bool),
        }
        for b, (p, r) in enumerate(zip(prompts, responses)):
            n = len(p) + len(r)
            out["tokens"][b, :n] = p + r
            out["valid"][b, :n] = True
            out["response"][b, len(p) - 1 : n - 1] = True
            out["reward_valid"][b, : n - (1 if r and r[-1] in self.stops else 0)] = True
        return out

    def text(self, response: list[int]) -> str:
        return self.tokenizer.decode([t for t in response if t not in self.stops])


def _prompts(cfg: Config, tokenizer, examples: list[dict]) -> list[list[int]]:
    chat = any(isinstance(prompt_messages(e), list) for e in examples)
    template = read_template(cfg.data.chat_template, tokenizer) if chat else None
    keep = cfg.data.seq_len - cfg.align.response_len
    out = []
    for e in examples:
        ids = encode_prompt(e, tokenizer, template)
        if not ids:
            raise DataError(f"a prompt encodes to no tokens: {prompt_messages(e)!r}")
        out.append(ids[-keep:])  # a long prompt keeps its end, nearest the answer
    return out


# ---------------------------------------------------------------------------------------------- the training


def train_rl(cfg: Config, *, stop_after: int | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) a ppo or grpo run in `cfg.train.run_dir` (see the module docstring)."""
    from jaxlm.train.trainer import _prepare_tokenizer, _progress, _StopOnSignal

    if cfg.train.objective not in RL_OBJECTIVES:
        raise ConfigError(f"train_rl trains {RL_OBJECTIVES}, not {cfg.train.objective}")
    if jax.process_count() > 1:
        raise ConfigError("ppo and grpo run in one process (over any mesh of its devices)")
    tc, ac, objective = cfg.train, cfg.align, cfg.train.objective
    run = RunDir(tc.run_dir)
    resuming = run.has_checkpoint()
    base = load_base(cfg.finetune.init_from)
    cfg = resolve(cfg, base.model)
    log.info("%s from %s", objective, base.source)
    check_layout(step_config(cfg), dict(make_mesh(cfg.mesh).shape))
    train_split, val_split = load_splits(cfg)
    run.path.mkdir(parents=True, exist_ok=True)
    tokenizer = _prepare_tokenizer(cfg, run, resuming, train_split, base)
    cfg, base_params = grow_vocab(cfg, base.params, tokenizer.vocab_size)
    base_params = fit_head(cfg, base_params, base.model)
    if resuming and run.config.is_file():
        check_resumable(load_config(run.config), cfg, ("model", "data", "peft"))
    save_config(cfg, run.config)
    reward = Reward(ac.reward, tokenizer)  # a missing or mismatched reward fails before anything compiles
    train_prompts, val_prompts = _prompts(cfg, tokenizer, train_split), _prompts(cfg, tokenizer, val_split)
    sharded = ShardedTraining(step_config(cfg))
    log.info("%s", sharded.describe())
    loader = RowLoader({"index": np.arange(len(train_prompts))}, batch_size=tc.batch_size, seed=cfg.data.seed)
    state = sharded.init_state(base_params)
    del base_params
    ckpt = Checkpointer(run.checkpoints, keep=tc.keep_checkpoints)
    start = 0
    if resuming:
        params, opt_state, meta = ckpt.restore(abstract(state.params), abstract(state.opt_state))
        state = sharded.restore_state(state, params, opt_state, meta["updates"], meta["rng"])
        loader.restore(meta["data"])
        start = int(meta["step"])
        log.info("resumed %s from step %d", run.path, start)

    rollouts = Rollouts(cfg, tokenizer, sharded)
    mesh = sharded.mesh
    sh = sharded.shardings
    scorer = jax.jit(
        on_mesh(make_scorer(sharded.graphdef, sharded.reference, ac.temperature, objective == "ppo"), mesh),
        in_shardings=(sh.params, sh.frozen, sh.ref, sharded.batch_sharding, sharded.batch_sharding),
    )
    advantages_fn = jax.jit(lambda *a: ppo_advantages(*a, ac))
    explained = jax.jit(explained_variance)
    rows_per_update = sharded.cfg.train.batch_size

    def put(rows: dict) -> dict:
        """Host rows -> arrays sharded like a batch (the batch sharding splits their leading axis)."""
        return {k: jax.device_put(v, sharded.batch_sharding) for k, v in rows.items()}

    def rollout(prompt_ids, examples, seed, group):
        """Samples, scores and lays out one batch; returns (host rows, rewards, texts) or raises the reward's error."""
        asked = [p for p in prompt_ids for _ in range(group)]
        responses = rollouts.sample(state, asked, seed)
        rows = rollouts.rows(asked, responses)
        completions = [rollouts.text(r) for r in responses]
        prompts = [prompt_messages(e) for e in examples for _ in range(group)]
        fields = {k: [x for x in v for _ in range(group)] for k, v in reward_fields(examples).items()}
        scores = reward(prompts, completions, fields, rows["tokens"], rows["reward_valid"])
        return rows, scores, completions

    def pad_rows(rows: dict, n: int) -> dict:
        """Rows repeated up to a multiple of n (the scorer's batch sharding), and how many were real."""
        extra = (-len(rows["tokens"])) % n
        return {k: np.concatenate([v, v[:extra]]) if extra else v for k, v in rows.items()}

    def score_rows(rows):
        n = len(rows["tokens"])
        padded = put(pad_rows({k: rows[k] for k in ("tokens", "valid")}, sharded.sizes["data"] * sharded.sizes["fsdp"]))
        logp, ref_logp, values = jax.device_get(
            scorer(state.params, state.frozen, state.ref, padded["tokens"], padded["valid"])
        )
        return logp[:n], ref_logp[:n], None if values is None else values[:n]

    def evaluate(step: int) -> dict:
        """Held-out prompts, sampled as in training with a fixed seed: mean reward, KL and response length."""
        n = len(val_prompts) if not tc.eval_batches else min(len(val_prompts), tc.eval_batches * tc.batch_size)
        rewards, kls, lengths = [], [], []
        for lo in range(0, n, tc.batch_size):
            idx = list(range(lo, min(n, lo + tc.batch_size)))
            try:
                rows, scores, _ = rollout([val_prompts[i] for i in idx], [val_split[i] for i in idx], 10**6 + lo, 1)
            except RewardFailed as e:  # no held-out figures this time
                log.warning("step %d: held-out evaluation skipped: align.reward %s", step, e)
                write({"step": step, "val_skipped": 1, "reason": str(e)})
                return {}
            logp, ref_logp, _ = score_rows(rows)
            m = rows["response"]
            rewards += scores.tolist()
            kls += np.sum((logp - ref_logp) * m, axis=1).tolist()
            lengths += m.sum(1).tolist()
        out = {"step": step, "val_reward": float(np.mean(rewards)), "val_kl": float(np.mean(kls))}
        out.update(val_response_len=float(np.mean(lengths)), val_prompts=n)
        write(out)
        return out

    metrics_file = open(run.metrics, "a", encoding="utf-8")

    def write(record: dict):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def save(step: int):
        meta = {"step": step, "updates": int(state.step), "base": cfg.finetune.init_from, "data": loader.state()}
        meta["rng"] = to_host(state.rng).tolist()
        meta["loss_scale"] = {"scale": 1.0, "good_steps": 0, "skipped": 0}
        ckpt.save(step, state.params, state.opt_state, meta, force=True)

    first = start == 0
    if first and (evaluation := evaluate(0)):
        log.info("before training: held-out reward %.4f, KL %.4f", evaluation["val_reward"], evaluation["val_kl"])
    end = min(tc.steps, stop_after) if stop_after is not None else tc.steps
    bar = _progress(progress, total=tc.steps, initial=start)
    failures, interrupted, evaluation, t0, step = 0, None, {}, time.perf_counter(), start
    with _StopOnSignal() as stopper:
        for step in range(start + 1, end + 1):
            idx = next(loader)["index"]
            examples = [train_split[i] for i in idx]
            t_roll = time.perf_counter()
            try:
                rows, scores, completions = rollout(
                    [train_prompts[i] for i in idx], examples, tc.seed * 100003 + step, ac.group
                )
            except RewardFailed as e:  # this step's rollouts are discarded, nothing else
                failures += 1
                log.warning("step %d skipped: align.reward %s: %s", step, ac.reward, e)
                write({"step": step, "skipped": 1, "reason": str(e)})
                if failures == step - start and failures >= FAILED_STARTS:
                    raise DataError(f"align.reward {ac.reward} failed on the first {failures} steps: {e}") from e
                bar.update(1)
                continue
            logp, ref_logp, values = score_rows(rows)
            t_train = time.perf_counter()
            m = rows["response"]
            batch = {k: rows[k] for k in ("tokens", "valid", "response")}
            batch["old_logp"] = logp
            record = {"step": step, "reward": float(np.mean(scores)), "reward_std": float(np.std(scores))}
            kl_tokens = (logp - ref_logp) * m
            record.update(kl=float(np.mean(kl_tokens.sum(1))), response_len=float(np.mean(m.sum(1))))
            if objective == "ppo":
                adv, _ = jax.device_get(advantages_fn(jnp.asarray(scores, jnp.float32), logp, ref_logp, values, m))
                batch.update(old_values=values, advantages=adv["advantages"], returns=adv["returns"])
                record["explained_variance"] = float(explained(values, adv["returns"], m))
                record["non_score_reward"] = float(np.mean(np.sum(adv["rewards"] * m, 1) - scores))
            else:
                batch["ref_logp"] = ref_logp
                batch["advantages"] = np.asarray(group_advantages(jnp.asarray(scores), ac.group))
                record["zero_std_groups"] = float(np.mean(scores.reshape(-1, ac.group).std(1) == 0))
            sums, n = {}, 0
            for epoch in range(ac.epochs):
                order = np.random.default_rng([tc.seed, step, epoch]).permutation(len(m))
                for lo in range(0, len(order), rows_per_update):
                    mb = {k: v[order[lo : lo + rows_per_update]] for k, v in batch.items()}
                    state, metrics = sharded.train_step(state, put(mb))
                    metrics = to_host(metrics)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n += 1
            record.update({f"train/{k}": v / n for k, v in sums.items() if k not in ("tokens",)})
            now = time.perf_counter()
            tokens = int(rows["valid"].sum())
            record.update(
                rollout_s=t_train - t_roll,
                train_s=now - t_train,
                rollout_tokens_per_s=float(m.sum()) / max(t_train - t_roll, 1e-9),
                train_tokens_per_s=tokens * ac.epochs / max(now - t_train, 1e-9),
            )
            write(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                if evaluation := evaluate(step):
                    bar.write(
                        f"step {step}: held-out reward {evaluation['val_reward']:.4f}, KL {evaluation['val_kl']:.4f}"
                    )
            if tc.ckpt_every and step % tc.ckpt_every == 0:
                save(step)
            if stopper.signum is not None:
                interrupted = stopper.signum
                break
    bar.close()
    if ckpt.latest_step() != step:
        save(step)
    if step >= tc.steps and interrupted is None:
        evaluation = evaluate(step)
    ckpt.close()
    metrics_file.close()
    return {"step": step, "elapsed_s": time.perf_counter() - t0, "interrupted": interrupted, **evaluation}
