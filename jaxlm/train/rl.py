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
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import RL_OBJECTIVES, Config, ConfigError
from jaxlm.data.chat import read_template, stop_ids
from jaxlm.data.instructions import RowLoader
from jaxlm.data.prompts import encode_prompt, prompt_messages, reward_fields
from jaxlm.data.tokenizer import same_vocabulary
from jaxlm.errors import DataError
from jaxlm.generate import Generator
from jaxlm.ops.rl import group_advantages
from jaxlm.parallel.state import to_host
from jaxlm.train.policy_gradient import explained_variance, make_scorer, ppo_advantages
from jaxlm.train.preference import reward_scores
from jaxlm.train.run_dir import load_model_dir
from jaxlm.train.session import Session
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
        loaded = load_model_dir(path, what="align.reward", head="score")
        model, rm_tokenizer = loaded.model, loaded.tokenizer
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
        self.stops = stop_ids(tokenizer)
        self.generator = None
        self.sampling = dict(temperature=ac.temperature, top_k=ac.top_k, top_p=ac.top_p)

    def sample(self, state, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Responses, each cut after its first stop token (kept: stopping is an action)."""
        model = nnx.merge(self.sharded.graphdef, state.params, state.frozen)
        if self.generator is None:
            self.generator = Generator(model)
        else:  # the same model with new weights: no recompilation
            self.generator.params = nnx.state(model)
        return self.generator.generate(
            prompts, max_new_tokens=self.R, seed=seed, stop_ids=self.stops, with_stop=True, **self.sampling
        )

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
    if cfg.train.objective not in RL_OBJECTIVES:
        raise ConfigError(f"train_rl trains {RL_OBJECTIVES}, not {cfg.train.objective}")
    if jax.process_count() > 1:
        raise ConfigError("ppo and grpo run in one process (over any mesh of its devices)")
    with Session(cfg, step_config=step_config, progress=progress) as session:
        cfg, tokenizer = session.cfg, session.tokenizer
        tc, ac = cfg.train, cfg.align
        reward = Reward(ac.reward, tokenizer)  # a missing or mismatched reward fails before anything compiles
        train_split, val_split = session.train_split, session.val_split
        train_prompts, val_prompts = _prompts(cfg, tokenizer, train_split), _prompts(cfg, tokenizer, val_split)
        update = Update(cfg, session.build())
        loader = RowLoader({"index": np.arange(len(train_prompts))}, batch_size=tc.batch_size, seed=cfg.data.seed)
        start = session.restore(loader)
        rollouts = Rollouts(cfg, tokenizer, session.sharded)

        def rollout(prompt_ids, examples, seed, group):
            """Samples, scores and lays out one batch: (host rows, rewards), or the reward's RewardFailed."""
            asked = [p for p in prompt_ids for _ in range(group)]
            responses = rollouts.sample(session.state, asked, seed)
            rows = rollouts.rows(asked, responses)
            prompts = [prompt_messages(e) for e in examples for _ in range(group)]
            fields = {k: [x for x in v for _ in range(group)] for k, v in reward_fields(examples).items()}
            completions = [rollouts.text(r) for r in responses]
            return rows, reward(prompts, completions, fields, rows["tokens"], rows["reward_valid"])

        failures = 0

        def step(s: int) -> dict:
            nonlocal failures
            idx = next(loader)["index"]
            t_roll = time.perf_counter()
            try:
                rows, scores = rollout(
                    [train_prompts[i] for i in idx], [train_split[i] for i in idx], tc.seed * 100003 + s, ac.group
                )
            except RewardFailed as e:  # this step's rollouts are discarded, nothing else
                failures += 1
                log.warning("step %d skipped: align.reward %s: %s", s, ac.reward, e)
                if failures == s - start and failures >= FAILED_STARTS:
                    raise DataError(f"align.reward {ac.reward} failed on the first {failures} steps: {e}") from e
                return {"skipped": 1, "reason": str(e)}
            t_train = time.perf_counter()
            session.state, record = update(session.state, rows, scores, s)
            now, m = time.perf_counter(), rows["response"]
            return record | dict(
                rollout_s=t_train - t_roll,
                train_s=now - t_train,
                rollout_tokens_per_s=float(m.sum()) / max(t_train - t_roll, 1e-9),
                train_tokens_per_s=int(rows["valid"].sum()) * ac.epochs / max(now - t_train, 1e-9),
            )

        def evaluate(s: int, whole: bool) -> dict:
            """Held-out prompts, sampled as in training with a fixed seed: mean reward, KL and response length."""
            n = len(val_prompts) if not tc.eval_batches else min(len(val_prompts), tc.eval_batches * tc.batch_size)
            rewards, kls, lengths = [], [], []
            for lo in range(0, n, tc.batch_size):
                idx = list(range(lo, min(n, lo + tc.batch_size)))
                try:
                    rows, scores = rollout([val_prompts[i] for i in idx], [val_split[i] for i in idx], 10**6 + lo, 1)
                except RewardFailed as e:  # no held-out figures this time
                    log.warning("step %d: held-out evaluation skipped: align.reward %s", s, e)
                    session.write({"step": s, "val_skipped": 1, "reason": str(e)})
                    return {}
                logp, ref_logp, _ = update.score(session.state, rows)
                m = rows["response"]
                rewards += scores.tolist()
                kls += np.sum((logp - ref_logp) * m, axis=1).tolist()
                lengths += m.sum(1).tolist()
            out = {"val_reward": float(np.mean(rewards)), "val_kl": float(np.mean(kls))}
            return out | {"val_response_len": float(np.mean(lengths)), "val_prompts": n}

        return session.run(
            step,
            evaluate,
            stop_after=stop_after,
            evaluate_first=True,
            show=("reward", "kl"),
            describe=lambda e: f"held-out reward {e['val_reward']:.4f}, KL {e['val_kl']:.4f}",
        )


class Update:
    """One RL step's learning from its rollouts: the policy's (and PPO's critic's) scores, advantages, and
    `align.epochs` x `align.minibatches` optimizer updates through the compiled, sharded train step."""

    def __init__(self, cfg: Config, sharded: ShardedTraining):
        self.cfg, self.sharded, ac = cfg, sharded, cfg.align
        sh, bs = sharded.shardings, sharded.batch_sharding
        ppo = cfg.train.objective == "ppo"
        self.scorer = jax.jit(
            on_mesh(make_scorer(sharded.graphdef, sharded.reference, ac.temperature, ppo), sharded.mesh),
            in_shardings=(sh.params, sh.frozen, sh.ref, bs, bs),
        )
        self.advantages = jax.jit(lambda *a: ppo_advantages(*a, ac))
        self.explained = jax.jit(explained_variance)

    def put(self, rows: dict) -> dict:
        """Host rows -> arrays sharded like a batch (the batch sharding splits their leading axis)."""
        return {k: jax.device_put(v, self.sharded.batch_sharding) for k, v in rows.items()}

    def score(self, state, rows: dict):
        """(logp, ref_logp, values or None) of the rows' targets, on the host."""
        n, sizes = len(rows["tokens"]), self.sharded.sizes
        extra = (-n) % (
            sizes["data"] * sizes["fsdp"] * sizes["expert"]
        )  # rows repeated up to the batch sharding's multiple
        padded = self.put({k: np.concatenate([rows[k], rows[k][:extra]]) for k in ("tokens", "valid")})
        logp, ref_logp, values = jax.device_get(
            self.scorer(state.params, state.frozen, state.ref, padded["tokens"], padded["valid"])
        )
        return logp[:n], ref_logp[:n], None if values is None else values[:n]

    def __call__(self, state, rows: dict, scores: np.ndarray, step: int):
        """(new state, the step's record: rewards, KL, response length, the objective's figures and the mean
        of each update's metrics as train/...)."""
        tc, ac = self.cfg.train, self.cfg.align
        logp, ref_logp, values = self.score(state, rows)
        m = rows["response"]
        batch = {k: rows[k] for k in ("tokens", "valid", "response")} | {"old_logp": logp}
        record = {"reward": float(np.mean(scores)), "reward_std": float(np.std(scores))}
        record.update(kl=float(np.mean(((logp - ref_logp) * m).sum(1))), response_len=float(np.mean(m.sum(1))))
        if tc.objective == "ppo":
            adv, _ = jax.device_get(self.advantages(jnp.asarray(scores, jnp.float32), logp, ref_logp, values, m))
            batch.update(old_values=values, advantages=adv["advantages"], returns=adv["returns"])
            record["explained_variance"] = float(self.explained(values, adv["returns"], m))
            record["non_score_reward"] = float(np.mean(np.sum(adv["rewards"] * m, 1) - scores))
        else:
            batch["ref_logp"] = ref_logp
            batch["advantages"] = np.asarray(group_advantages(jnp.asarray(scores), ac.group))
            record["zero_std_groups"] = float(np.mean(scores.reshape(-1, ac.group).std(1) == 0))
        sums, n, rows_per_update = {}, 0, self.sharded.cfg.train.batch_size
        for epoch in range(ac.epochs):
            order = np.random.default_rng([tc.seed, step, epoch]).permutation(len(m))
            for lo in range(0, len(order), rows_per_update):
                mb = {k: v[order[lo : lo + rows_per_update]] for k, v in batch.items()}
                state, metrics = self.sharded.train_step(state, self.put(mb))
                for k, v in to_host(metrics).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        return state, record | {f"train/{k}": v / n for k, v in sums.items() if k != "tokens"}
