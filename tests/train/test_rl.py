"""PPO and GRPO: invariants of an update, sharded equals one device, and the CLI end to end (rollouts, rewards
from functions and from a reward-model run, skipped steps, exact resume) from a tiny pretrained run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.data.shakespeare_instructions import instruction_splits
from jaxlm.errors import DataError
from jaxlm.train.policy_gradient import make_scorer
from jaxlm.train.rl import Rollouts, step_config
from jaxlm.train.sharded import ShardedTraining, on_mesh
from jaxlm.train.step import reference_model
from jaxlm.train.trainer import read_metrics, train
from tests.parallel.test_layouts import BASE, LAYOUTS
from tests.train import toy_rewards

RL = ["finetune.init_from=supplied-by-the-test", "align.reward=tests.train.toy_rewards:vowels", "data.seq_len=24"]
RL += ["train.batch_size=8", "align.response_len=8", "train.weight_decay=0", "train.warmup_steps=0"]


def sharded_for(objective, overrides):
    extra = ["align.group=1"] if objective == "ppo" else ["align.group=2", "train.batch_size=4"]
    cfg = load_config("configs/llama_tiny.yaml", BASE + RL + [f"train.objective={objective}", *extra, *overrides])
    return ShardedTraining(step_config(cfg)), cfg


def rollout_batch(sharded, state, seed=0, rows=8, T=24):
    """Random prompt + response rows scored by the policy: the batch an update gets (advantages left to fill)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 256, (rows, T)).astype(np.int32)
    lengths = rng.integers(14, T + 1, rows)
    valid = np.arange(T) < lengths[:, None]
    response = (np.arange(T - 1) >= 9) & (np.arange(T - 1) < lengths[:, None] - 1)
    sh, bs = sharded.shardings, sharded.batch_sharding
    score = make_scorer(sharded.graphdef, sharded.reference, 1.0, values=sharded.cfg.model.value_head)
    scorer = jax.jit(on_mesh(score, sharded.mesh), in_shardings=(sh.params, sh.frozen, sh.ref, bs, bs))
    logp, ref_logp, values = jax.device_get(
        scorer(state.params, state.frozen, state.ref, jax.device_put(tokens, bs), jax.device_put(valid, bs))
    )
    batch = {"tokens": tokens, "valid": valid, "response": response, "old_logp": logp}
    return batch, ref_logp, values


def put(sharded, batch):
    return {k: jax.device_put(v, sharded.batch_sharding) for k, v in batch.items()}


@pytest.mark.parametrize("objective,peft", [("ppo", "lora"), ("ppo", "none"), ("grpo", "lora")])
def test_policy_starts_as_its_reference_and_null_updates_change_nothing(objective, peft):
    """KL is 0 at the start (a kept copy, or LoRA's adapters off); a PPO update with zero advantages, ratio 1 and
    returns equal to the values, or a GRPO update whose groups have equal rewards, leaves every weight as it was."""
    sharded, cfg = sharded_for(objective, [f"peft.method={peft}", "mesh.data=1"])
    state = sharded.init_state()
    batch, ref_logp, values = rollout_batch(sharded, state)
    np.testing.assert_array_equal(batch["old_logp"], ref_logp)
    if objective == "ppo":
        zeros = np.zeros_like(batch["old_logp"])
        batch.update(old_values=values, returns=values, advantages=zeros)
    else:
        from jaxlm.ops.rl import group_advantages

        batch.update(ref_logp=ref_logp, advantages=np.asarray(group_advantages(jnp.full(8, 0.7), cfg.align.group)))
        assert not np.any(batch["advantages"])
    before = jax.device_get(state.params)
    state, metrics = sharded.train_step(state, put(sharded, batch))
    # GRPO's KL term has zero gradient where the policy equals its reference; the step's own forward pass (LoRA
    # on, B = 0) can round its log-probs a few ulps away from the scorer's (jax 0.10: 2.5e-9), which Adam turns
    # into a step. Anything above rounding is a real gradient.
    grad_norm = float(metrics["grad_norm"])
    assert grad_norm < 1e-7
    if grad_norm == 0.0:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def _gradient(sharded, state, batch):
    def f(p):
        ref = reference_model(sharded.graphdef, state.params, state.frozen, state.ref, sharded.reference)
        return sharded.loss(nnx.merge(sharded.graphdef, p, state.frozen), ref, batch, jax.random.PRNGKey(0))[0]

    return jax.device_get(jax.jit(on_mesh(jax.grad(f), sharded.mesh))(state.params))


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_update_under_a_mesh_equals_one_device(objective):
    """One update (loss, metrics, gradient) on fsdp x tensor x data equals one device's to 1e-5."""
    out = []
    for layout in (LAYOUTS["fsdp=2 tensor=2 data=2"], ["mesh.data=1"]):
        sharded, cfg = sharded_for(objective, ["peft.method=lora", "peft.rank=4", *layout])
        state = sharded.init_state()
        batch, ref_logp, values = rollout_batch(sharded, state)
        rng = np.random.default_rng(1)
        batch["old_logp"] = batch["old_logp"] + rng.normal(0, 0.1, batch["old_logp"].shape).astype(np.float32)
        if objective == "ppo":
            batch.update(old_values=values, advantages=rng.normal(size=values.shape).astype(np.float32))
            batch["returns"] = values + rng.normal(size=values.shape).astype(np.float32)
        else:
            batch.update(ref_logp=ref_logp, advantages=rng.normal(size=8).astype(np.float32))
        grads = _gradient(sharded, state, put(sharded, batch))
        _, metrics = sharded.train_step(state, put(sharded, batch))
        out.append((jax.device_get(metrics), grads, sharded.mesh.size))
    (got, g_grads, n), (want, w_grads, _) = out
    assert n == 8
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for (path, a), b in zip(jax.tree.leaves_with_path(g_grads), jax.tree.leaves(w_grads)):
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


def test_rl_config_errors():
    base = ["finetune.init_from=x", "data.seq_len=32"]
    with pytest.raises(ConfigError, match="align.reward"):
        load_config("configs/llama_tiny.yaml", base + ["train.objective=grpo"])
    with pytest.raises(ConfigError, match="align.group must be >= 2"):
        load_config("configs/llama_tiny.yaml", base + ["train.objective=grpo", "align.reward=a:b", "align.group=1"])
    with pytest.raises(ConfigError, match="ppo takes 1"):
        load_config("configs/llama_tiny.yaml", base + ["train.objective=ppo", "align.reward=a:b", "align.group=4"])
    with pytest.raises(ConfigError, match="room for the prompt"):
        load_config(
            "configs/llama_tiny.yaml",
            base + ["train.objective=ppo", "align.reward=a:b", "align.group=1", "align.response_len=32"],
        )
    with pytest.raises(ConfigError, match="align.minibatches"):
        load_config(
            "configs/llama_tiny.yaml",
            base + ["train.objective=ppo", "align.reward=a:b", "align.group=1", "align.minibatches=3"],
        )
    cfg = load_config("configs/llama_tiny.yaml", base + ["train.objective=ppo", "align.reward=a:b", "align.group=1"])
    assert cfg.model.value_head and cfg.align.estimator("ppo") == "k1" and cfg.align.estimator("grpo") == "k3"


def _prompts(tmp_path, n_train=16, n_val=8):
    train, val = instruction_splits()
    for name, rows in (("train", train[::300][:n_train]), ("val", val[::40][:n_val])):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e) + "\n" for e in rows)
    return [f"data.source={tmp_path / 'train.jsonl'}", f"data.val_source={tmp_path / 'val.jsonl'}"]


def _cli(pretrained, tmp_path, config, run, *extra):
    args = ["train", f"configs/{config}.yaml", *_prompts(tmp_path), f"finetune.init_from={pretrained}"]
    args += ["data.seq_len=64", "align.response_len=6", "train.batch_size=4", "mesh.data=1", "train.eval_batches=1"]
    args += ["train.warmup_steps=0", "train.eval_every=0", f"train.run_dir={run}", *extra, "--no-progress"]
    return main(args)


@pytest.mark.parametrize("config", ["grpo", "ppo"])
def test_cli_trains_resumes_exactly(pretrained, tmp_path, config):
    reward = "align.reward=tests.train.toy_rewards:vowels"
    extra = [reward, "train.steps=3", "align.group=2"] if config == "grpo" else [reward, "train.steps=3"]
    assert _cli(pretrained, tmp_path, config, tmp_path / "straight", *extra) == 0
    assert _cli(pretrained, tmp_path, config, tmp_path / "resumed", *extra, "--stop-after", "1") == 0
    assert _cli(pretrained, tmp_path, config, tmp_path / "resumed", *extra) == 0
    steps = lambda run: [m for m in read_metrics(tmp_path / run) if "reward" in m]  # noqa: E731
    straight, resumed = steps("straight"), steps("resumed")
    assert [m["step"] for m in straight] == [1, 2, 3] and [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("reward", "kl", "train/loss", "response_len"):
            assert a[key] == b[key], key
    evals = [m for m in read_metrics(tmp_path / "straight") if "val_reward" in m]
    assert [e["step"] for e in evals] == [0, 3] and evals[0]["val_kl"] == 0.0
    keys = {"reward", "kl", "train/entropy", "train/clipfrac", "rollout_tokens_per_s", "train_tokens_per_s"}
    keys |= {"explained_variance", "train/value_loss", "train/approx_kl"} if config == "ppo" else {"train/kl"}
    assert keys <= set(straight[0])


def test_failing_rewards_skip_steps_or_stop(pretrained, tmp_path, caplog):
    toy_rewards.CALLS["n"] = 0  # call 1: the held-out evaluation; 2 (step 1) raises, 3 (step 2) is NaN
    run = tmp_path / "flaky"
    flaky = ["align.reward=tests.train.toy_rewards:flaky", "train.steps=3", "align.group=2"]
    assert _cli(pretrained, tmp_path, "grpo", run, *flaky) == 0
    records = [m for m in read_metrics(run) if "step" in m and m["step"] > 0 and "val_reward" not in m]
    assert [m.get("skipped", 0) for m in records] == [1, 1, 0]
    assert "the grader is down" in records[0]["reason"] and "non-finite" in records[1]["reason"]
    assert "step 1 skipped" in caplog.text
    for name, message in (("broken", "failed on the first 3 steps"), ("wrong_length", "returned 1 values")):
        cfg = load_config(
            "configs/grpo.yaml",
            [*_prompts(tmp_path), f"finetune.init_from={pretrained}", f"align.reward=tests.train.toy_rewards:{name}"]
            + ["data.seq_len=64", "align.response_len=4", "train.batch_size=4", "mesh.data=1", "train.steps=3"]
            + ["align.group=2", "train.eval_batches=1", "train.eval_every=0", f"train.run_dir={tmp_path / name}"],
        )
        with pytest.raises((DataError, ValueError), match=message):
            train(cfg, progress=False)

    # Only the reward's failures skip a step: a failure of jaxlm's own sampling stops the run at once.
    def broken_sampler(*_):
        raise RuntimeError("a sampler bug")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Rollouts, "sample", broken_sampler)
        cfg = load_config(
            "configs/grpo.yaml",
            [*_prompts(tmp_path), f"finetune.init_from={pretrained}", "align.reward=tests.train.toy_rewards:vowels"]
            + ["data.seq_len=64", "align.response_len=4", "train.batch_size=4", "mesh.data=1", "train.steps=3"]
            + ["align.group=2", "train.eval_batches=1", "train.eval_every=0", f"train.run_dir={tmp_path / 'bug'}"],
        )
        with pytest.raises(RuntimeError, match="a sampler bug"):
            train(cfg, progress=False)
    overrides = [*_prompts(tmp_path), f"finetune.init_from={pretrained}", "data.seq_len=64"]
    with pytest.raises(ConfigError, match="neither a run directory nor module:function"):
        train(load_config("configs/grpo.yaml", [*overrides, "align.reward=nowhere", f"train.run_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="cannot import"):
        train(
            load_config(
                "configs/grpo.yaml", [*overrides, "align.reward=jaxlm.rewards:nope", f"train.run_dir={tmp_path / 'x'}"]
            )
        )


def test_ppo_with_a_reward_model_run(pretrained, tmp_path, corpus_file):
    """RLHF proper: a reward-model run scores the rollouts; one of another tokenizer is refused by name."""
    from tests.conftest import TINY

    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Who speaks {i}?", "chosen": " ROMEO", "rejected": " nobody at all"}) + "\n")
    rm = tmp_path / "rm"
    args = ["train", "configs/reward.yaml", f"data.source={pairs}", "data.val_fraction=0.25", "data.seq_len=32"]
    args += [f"finetune.init_from={pretrained}", "train.batch_size=4", "train.steps=2", "mesh.data=1"]
    assert main([*args, "train.eval_batches=1", f"train.run_dir={rm}", "--no-progress"]) == 0
    run = tmp_path / "ppo"
    assert _cli(pretrained, tmp_path, "ppo", run, f"align.reward={rm}", "train.steps=2") == 0
    assert all(math.isfinite(m["reward"]) for m in read_metrics(run) if "reward" in m)
    other = tmp_path / "other_base"  # a base with a byte tokenizer: its reward model reads other ids
    base_args = ["train", "configs/llama_tiny.yaml", *TINY, f"data.source={corpus_file}", f"train.run_dir={other}"]
    assert main([*base_args, "data.tokenizer=byte", "train.steps=1", "--no-progress"]) == 0
    rm2 = tmp_path / "rm2"
    args2 = [a for a in args if not a.startswith("finetune.init_from")] + [f"finetune.init_from={other}"]
    assert main([*args2, "train.eval_batches=1", f"train.run_dir={rm2}", "--no-progress"]) == 0
    with pytest.raises(ConfigError, match="another tokenizer"):
        overrides = [*_prompts(tmp_path), f"finetune.init_from={pretrained}", "data.seq_len=64"]
        train(load_config("configs/ppo.yaml", [*overrides, f"align.reward={rm2}", f"train.run_dir={tmp_path / 'y'}"]))


def test_rl_loop_under_a_mesh(pretrained, tmp_path):
    """The whole loop (sampling with sharded weights, scoring, updates) on fsdp x tensor; resumable there."""
    mesh = ["mesh.fsdp=2", "mesh.tensor=2", "align.group=2", "train.steps=2"]
    run = tmp_path / "mesh"
    assert _cli(pretrained, tmp_path, "grpo", run, "align.reward=tests.train.toy_rewards:vowels", *mesh) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) for r in records if "reward" in r)
