"""The training session every loop shares: each objective stops and resumes bit-for-bit (fp16 RL with several
updates a step included), and checkpoint metadata has one layout that reads every earlier writer's."""

import json

import pytest

from jaxlm.cli import main
from jaxlm.errors import DataError
from jaxlm.train.checkpoint import CheckpointMeta
from jaxlm.train.trainer import read_metrics
from tests.conftest import TINY
from tests.train.test_align import COMMON, _pairs_files
from tests.train.test_rl import _prompts

TIMINGS = {"tokens_per_s", "rollout_s", "train_s", "rollout_tokens_per_s", "train_tokens_per_s"}


def _records(run) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in read_metrics(run)]


def _straight_and_resumed(argv, tmp_path, stop=2):
    """The same run straight through, and stopped at `stop` then resumed: their metrics.jsonl records."""
    for run, extra in (("straight", []), ("resumed", ["--stop-after", str(stop)]), ("resumed", [])):
        assert main([*argv, f"train.run_dir={tmp_path / run}", *extra, "--no-progress"]) == 0
    return _records(tmp_path / "straight"), _records(tmp_path / "resumed")


def _argv(kind, tmp_path, corpus_file, pretrained):
    if kind == "moe":  # a mixture of experts with the routers' losses
        data = [f"data.source={corpus_file}", "data.tokenizer=byte", "model.expert_mlp_dim=16"]
        return ["train", "configs/moe_tiny.yaml", *TINY, *data]
    if kind in ("mlm", "span"):
        config = "bert_tiny" if kind == "mlm" else "t5_tiny"
        return ["train", f"configs/{config}.yaml", *TINY, f"data.source={corpus_file}", "data.tokenizer=byte"]
    tuned = [f"finetune.init_from={pretrained}", "train.steps=4", "train.log_every=3", "train.eval_batches=1"]
    if kind == "sft":
        return ["train", "configs/sft_lora.yaml", *tuned, "data.seq_len=64", "train.batch_size=4", "mesh.data=1"]
    if kind == "reward":
        return ["train", "configs/reward.yaml", *_pairs_files(tmp_path), *COMMON, *tuned]
    # fp16 GRPO, two updates a step: the loss scale and the update count must come back from the checkpoint
    argv = ["train", "configs/grpo.yaml", *_prompts(tmp_path), *tuned, "data.seq_len=64", "align.response_len=6"]
    argv += ["train.batch_size=4", "align.group=2", "align.minibatches=2", "mesh.data=1", "train.warmup_steps=0"]
    return argv + ["train.precision=fp16", "train.loss_scale_window=1", "align.reward=tests.train.toy_rewards:vowels"]


@pytest.mark.parametrize("kind", ["mlm", "span", "sft", "reward", "grpo_fp16", "moe"])
def test_every_objective_stops_and_resumes_bit_for_bit(kind, tmp_path, corpus_file, pretrained):
    straight, resumed = _straight_and_resumed(_argv(kind, tmp_path, corpus_file, pretrained), tmp_path)
    steps = [r["step"] for r in straight if "val_loss" not in r and "val_reward" not in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert resumed == straight  # every figure of every step and evaluation
    if kind == "moe":
        assert all(r["train/moe_aux_loss"] >= 2.0 - 1e-3 for r in straight if "train/loss" in r), straight[0]
    if kind == "grpo_fp16":
        meta = json.loads((tmp_path / "resumed" / "checkpoints" / "2" / "meta" / "metadata").read_text())
        assert meta["updates"] == 4 and meta["loss_scale"]["scale"] != 32768.0  # it moved over the updates
        assert len({r["train/loss_scale"] for r in straight if "train/loss_scale" in r}) > 1


def test_checkpoint_metadata_reads_every_earlier_layout():
    trainer = {"step": 3, "base": None, "rng": [0, 1], "data": {"epoch": 0}, "loss_scale": None}
    assert CheckpointMeta.from_json(trainer).optimizer_steps == 3
    rl = {**trainer, "updates": 12, "loss_scale": {"scale": 1.0, "good_steps": 0, "skipped": 0}}
    assert CheckpointMeta.from_json(rl).optimizer_steps == 12
    converted = CheckpointMeta.from_json({"step": 0, "rng": [0, 7], "data": None, "from": "hf/dir"})
    assert converted.source == "hf/dir" and converted.data is None
    assert CheckpointMeta.from_json(converted.to_json()) == converted
    with pytest.raises(DataError, match=r"\['shiny'\] are unknown"):
        CheckpointMeta.from_json({**trainer, "shiny": 1}, "ckpt/3")
    with pytest.raises(DataError, match="lacks"):
        CheckpointMeta.from_json({"step": 3})
