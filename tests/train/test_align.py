"""Reward-model and DPO training: invariants of the first step, sharded equals one device, and the CLI end to end
(train, eval, resume, export) from a tiny pretrained run."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.data.shakespeare_preferences import preference_splits
from jaxlm.train.run_dir import load_run
from jaxlm.train.sharded import ShardedTraining, on_mesh
from jaxlm.train.step import reference_model
from jaxlm.train.trainer import read_metrics
from tests.parallel.test_layouts import BASE, LAYOUTS
from tests.parity import require

ALIGN = ["finetune.init_from=supplied-by-the-test", "train.batch_size=8", "train.grad_accum=2", "data.seq_len=24"]


def pair_batches(n=3, pairs=8, seq=24, vocab=256, seed=0):
    """n batches of (P, 2, T) pairs: a shared random-walk prompt, two different completions, right padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = np.cumsum(rng.integers(-2, 3, (pairs, 2, seq)), axis=-1) % vocab
        tokens[:, 1, :10] = tokens[:, 0, :10]  # the prompt: 10 tokens
        lengths = rng.integers(14, seq + 1, (pairs, 2))
        valid = np.arange(seq) < lengths[..., None]
        mask = valid & (np.arange(seq) >= 10)
        out.append({"tokens": np.where(valid, tokens, 0).astype(np.int32), "valid": valid, "mask": mask})
    return out


def steps(overrides, objective="dpo", n=3):
    extra = ["model.head=score"] if objective == "reward" else []
    cfg = load_config("configs/llama_tiny.yaml", BASE + ALIGN + [f"train.objective={objective}", *extra, *overrides])
    sharded = ShardedTraining(cfg)
    state, metrics, params = sharded.init_state(), [], []
    for b in pair_batches(n):
        state, m = sharded.train_step(state, sharded.put_batch(b))
        metrics.append(jax.device_get(m))
        params.append(jax.device_get(state.params))
    return metrics, params, sharded


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_first_dpo_step_is_log2_with_zero_rewards(peft):
    """The policy starts as its reference (a kept copy, or LoRA's adapters off): DPO's loss is log 2."""
    metrics, _, sharded = steps([f"peft.method={peft}", "mesh.data=1"], n=3)
    assert sharded.reference == ("copy" if peft == "none" else "adapters_off")
    first = metrics[0]
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(first[k])) < 1e-6
    assert float(metrics[-1]["loss"]) != pytest.approx(math.log(2), abs=1e-6)  # the policy moved (lr 0 at step 1)


def _gradient(sharded, state, batch):
    """The gradient of the step's loss (summed over the batch) at `state`, computed on the step's mesh."""

    def f(p):
        ref = reference_model(sharded.graphdef, state.params, state.frozen, state.ref, sharded.reference)
        return sharded.loss(nnx.merge(sharded.graphdef, p, state.frozen), ref, batch, jax.random.PRNGKey(0))[0]

    return jax.device_get(jax.jit(on_mesh(jax.grad(f), sharded.mesh))(state.params))


@pytest.mark.parametrize("objective,peft", [("dpo", "none"), ("dpo", "lora"), ("reward", "lora")])
def test_sharded_equals_one_device(objective, peft):
    """On fsdp x tensor x data: the gradient of one step, and the losses and metrics of three steps, equal one
    device's to 1e-5.

    Gradients are compared rather than Adam's updates: DPO's and Bradley-Terry's gradients are differences of two
    sequences' gradients, some elements nearly cancel, and Adam divides each element by its own magnitude, so
    float32 rounding of an element near 0 becomes a visible step (LoRA's B starts at 0, where it is all there is)."""
    extra = [f"peft.method={peft}", "peft.rank=4", "train.warmup_steps=0"]
    got, _, sharded = steps(LAYOUTS["fsdp=2 tensor=2 data=2"] + extra, objective)
    want, _, one = steps(["mesh.data=1", *extra], objective)
    assert sharded.mesh.size == 8
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
        for key in w:  # rewards and margins are differences of summed log-probs of size ~40: absolute 1e-5
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-5, err_msg=key)
    batch = pair_batches(1)[0]
    grads = [_gradient(s, s.init_state(), s.put_batch(batch)) for s in (sharded, one)]
    leaves = jax.tree.leaves_with_path(grads[0])
    assert len(leaves) == len(jax.tree.leaves(grads[1])) > 0
    for (path, a), b in zip(leaves, jax.tree.leaves(grads[1])):
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


def test_alignment_config_errors():
    base = ["train.objective=dpo"]
    with pytest.raises(ConfigError, match="finetune.init_from"):
        load_config("configs/llama_tiny.yaml", base)
    with pytest.raises(ConfigError, match="adapters off"):
        load_config("configs/llama_tiny.yaml", base + ["finetune.init_from=x", "peft.method=prompt", "data.pack=false"])
    with pytest.raises(ConfigError, match="model.head=score"):
        load_config("configs/llama_tiny.yaml", ["train.objective=reward", "finetune.init_from=x"])
    with pytest.raises(ConfigError, match="model.head=score"):
        load_config("configs/llama_tiny.yaml", ["model.head=score"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config("configs/llama_tiny.yaml", base + ["finetune.init_from=x", "align.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="align.dpo_loss"):
        load_config("configs/llama_tiny.yaml", base + ["finetune.init_from=x", "align.dpo_loss=kto"])
    for objective in ("dpo", "reward", "ppo", "grpo"):  # z_loss is cross-entropy's; it would do nothing here
        extra = {"reward": ["model.head=score"], "ppo": ["align.reward=a:b"], "grpo": ["align.reward=a:b"]}
        with pytest.raises(ConfigError, match=f"train.z_loss .* train.objective={objective} has no such loss"):
            load_config(
                "configs/llama_tiny.yaml",
                [
                    f"train.objective={objective}",
                    "finetune.init_from=x",
                    "train.z_loss=1e-4",
                    *extra.get(objective, []),
                ],
            )


def _pairs_files(tmp_path):
    train, val = preference_splits()
    for name, pairs in (("train", train[::100][:40]), ("val", val[::30])):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    return [f"data.source={tmp_path / 'train.jsonl'}", f"data.val_source={tmp_path / 'val.jsonl'}"]


COMMON = ["data.seq_len=64", "train.batch_size=4", "mesh.data=1", "train.eval_batches=1", "train.warmup_steps=1"]


def test_reward_model_cli_and_export(pretrained, tmp_path, capsys):
    """A reward model from a language-model run (its trunk under a new score head, LoRA), evaluated, then merged
    and written as LlamaForSequenceClassification, whose scores transformers computes the same."""
    torch = require("torch")
    transformers = require("transformers")
    run = tmp_path / "rm"
    args = ["train", "configs/reward.yaml", *_pairs_files(tmp_path), *COMMON, f"finetune.init_from={pretrained}"]
    assert main([*args, "train.steps=3", f"train.run_dir={run}", "--no-progress"]) == 0
    records = read_metrics(run)
    assert records[0]["step"] == 0 and {"val_accuracy", "val_margin", "val_pairs"} <= set(records[0])  # before
    assert {"accuracy", "margin", "reward_chosen"} <= set(records[1])
    assert {"val_accuracy", "val_margin", "val_pairs"} <= set(records[-1]) and records[-1]["step"] == 3
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "preference accuracy" in capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "ROMEO."]) == 2  # a score head writes no text
    assert "head=score" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "adapter")]) != 0
    assert "--merge" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf"), "--merge"]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"

    from jaxlm.train.preference import reward_scores

    cfg, tokenizer, model, _ = load_run(run)
    texts = ["ROMEO.\nWho speaks? Answer: ROMEO", "Question: Who? Answer: a name"]
    ids = [tokenizer.encode(t) for t in texts]
    T = max(map(len, ids))
    tokens = np.array([x + [tokenizer.eos_id] * (T - len(x)) for x in ids])
    valid = np.arange(T) < np.array([len(x) for x in ids])[:, None]
    ours = np.asarray(reward_scores(model, tokens, valid))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits[:, 0].numpy()  # pads with end-of-text, the config's pad_token_id
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dpo_cli_full_resumes_exactly(pretrained, tmp_path, capsys):
    """Full-model DPO keeps its start as the reference; stopping and resuming rebuilds it: same losses."""
    files = _pairs_files(tmp_path)
    base = ["train", "configs/dpo.yaml", *files, *COMMON, f"finetune.init_from={pretrained}", "peft.method=none"]
    base += ["train.steps=4", "train.log_every=1"]
    assert main([*base, f"train.run_dir={tmp_path / 'straight'}", "--no-progress"]) == 0
    assert main([*base, f"train.run_dir={tmp_path / 'resumed'}", "--stop-after", "2", "--no-progress"]) == 0
    assert main([*base, f"train.run_dir={tmp_path / 'resumed'}", "--no-progress"]) == 0
    losses = lambda r: [m["loss"] for m in read_metrics(tmp_path / r) if "loss" in m]  # noqa: E731
    assert losses("straight")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses("resumed") == losses("straight")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "straight")]) == 0
    assert "preference accuracy" in capsys.readouterr().out
    ev = [m for m in read_metrics(tmp_path / "straight") if "val_loss" in m][-1]
    assert {"val_rewards/accuracies", "val_logps/accuracies", "val_rewards/margins"} <= set(ev)


def test_dpo_on_chat_pairs_with_lora(pretrained, tmp_path):
    pair = lambda i, good, bad: {  # noqa: E731
        "prompt": [{"role": "user", "content": f"ROMEO.\nSpeak, friend {i}. Who speaks?"}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps(pair(i, "ROMEO", "IAGO")) + "\n")
        f.write(json.dumps(pair(99, "SAME", "SAME")) + "\n")  # left out with a warning
    run = tmp_path / "chat_dpo"
    args = ["train", "configs/dpo.yaml", f"data.source={tmp_path / 'chat.jsonl'}", "data.val_fraction=0.25"]
    args += [*COMMON, f"finetune.init_from={pretrained}", "train.steps=2", f"train.run_dir={run}", "--no-progress"]
    assert main(args) == 0
    _, tokenizer, _, step = load_run(run)
    assert step == 2 and tokenizer.token_id("<|im_end|>") is not None


def test_dpo_reference_routers_stay_out_of_the_moe_losses():
    """A mixture's routers' losses are the policy's: the frozen reference's forward inside DPO's loss adds no
    statistics (they would dilute the policy's balancing loss in the average)."""
    import jax.numpy as jnp

    from jaxlm.config import AlignConfig, ModelConfig
    from jaxlm.nn.models import build_model
    from jaxlm.nn.moe import router_stats
    from jaxlm.train.preference import make_dpo_loss, sequence_logprobs

    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=32, num_experts=4)
    policy, reference = build_model(cfg, rngs=nnx.Rngs(0)), build_model(cfg, rngs=nnx.Rngs(1))
    batch = {k: jnp.asarray(v) for k, v in pair_batches(1, pairs=2)[0].items()}
    with router_stats() as found:
        make_dpo_loss(AlignConfig())(policy, reference, batch, jax.random.PRNGKey(0))
    with router_stats() as alone:
        sequence_logprobs(policy, batch)
    assert len(found) == len(alone) == 1
    np.testing.assert_array_equal(np.asarray(found[0]["load"]), np.asarray(alone[0]["load"]))
