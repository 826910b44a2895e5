"""train.precision: bf16/fp16 compute on float32 master weights; fp16 dynamic loss scaling."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.train import read_metrics, train
from jaxlm.train.sharded import ShardedTraining
from tests.conftest import TINY


def test_precision_config():
    cfg = load_config("configs/llama_tiny.yaml", ["train.precision=bf16"])
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    assert load_config("configs/llama_tiny.yaml", ["train.precision=fp16"]).model.dtype == "float16"
    with pytest.raises(ConfigError, match="train.precision must be one of .*'fp8'"):
        load_config("configs/llama_tiny.yaml", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 conflicts with train.precision=fp16"):
        load_config("configs/llama_tiny.yaml", ["model.dtype=bfloat16", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.loss_scale"):
        load_config("configs/llama_tiny.yaml", ["train.loss_scale=0.5"])
    assert load_config("configs/llama2_7b.yaml").model.dtype == "bfloat16"  # the sharded presets train in bf16


def _losses(run_dir, key="loss"):
    return {m["step"]: m[key] for m in read_metrics(run_dir) if "loss" in m}


@pytest.mark.slow
def test_fp16_and_bf16_follow_fp32_for_50_steps(tmp_path):
    """On the embedded corpus: fp16 (loss-scaled) within 5e-4 nats of fp32 for 20 steps and the same level
    after 50 (mean of the last 10 within 1e-2); bf16 within 2e-2 at every step.

    Later steps are chaotic: a reassociated sum (the global norm over a reordered parameter tree moved the
    fp32 run by 1e-5) makes fp16's late-step gap 1.3e-3 to 1.6e-2 depending on the seed (measured, seeds
    0-2), while the first 20 steps agree within 1.1e-4 for every seed."""
    runs = {}
    for precision in ("fp32", "fp16", "bf16"):
        extra = ["data.source=shakespeare", "data.tokenizer=byte", "train.steps=50", f"train.precision={precision}"]
        cfg = load_config("configs/llama_tiny.yaml", TINY + extra + [f"train.run_dir={tmp_path / precision}"])
        train(cfg, progress=False)
        runs[precision] = _losses(tmp_path / precision)
    fp32 = np.array([runs["fp32"][s] for s in range(1, 51)])
    assert fp32[-5:].mean() < fp32[0] - 1.0  # it learned
    fp16 = np.array([runs["fp16"][s] for s in range(1, 51)])
    np.testing.assert_allclose(fp16[:20], fp32[:20], atol=5e-4)
    assert abs(fp16[-10:].mean() - fp32[-10:].mean()) < 1e-2
    np.testing.assert_allclose([runs["bf16"][s] for s in range(1, 51)], fp32, atol=2e-2)
    assert {m["skipped"] for m in read_metrics(tmp_path / "fp16") if "loss" in m} == {0}


def _fp16(tmp_path, *extra):
    return load_config(
        "configs/llama_tiny.yaml",
        TINY + ["data.tokenizer=byte", "train.precision=fp16", f"train.run_dir={tmp_path}", *extra],
    )


def _batch(sharded, cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
    return sharded.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})


def test_overflow_skips_exactly_that_step_and_halves_the_scale(tmp_path):
    cfg = _fp16(tmp_path, "train.loss_scale_window=2")
    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    assert float(state.loss_scale.scale) == 32768.0
    state, m = sharded.train_step(state, _batch(sharded, cfg, 1))
    assert bool(m["finite"]) and float(m["loss_scale"]) == 32768.0
    # Inject an overflow: a scale so large that the scaled loss is infinite.
    state = state._replace(loss_scale=state.loss_scale._replace(scale=jnp.float32(3e38)))
    before = jax.device_get((state.params, state.opt_state))
    state, m = sharded.train_step(state, _batch(sharded, cfg, 2))
    assert not bool(m["finite"])
    assert int(state.step) == 2 and int(state.loss_scale.skipped) == 1 and int(state.loss_scale.good_steps) == 0
    assert float(state.loss_scale.scale) == pytest.approx(1.5e38)
    after = jax.device_get((state.params, state.opt_state))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # Back to a sane scale: updates resume; after `loss_scale_window` finite steps in a row the scale doubles.
    state = state._replace(loss_scale=state.loss_scale._replace(scale=jnp.float32(1024.0)))
    state, m = sharded.train_step(state, _batch(sharded, cfg, 3))
    assert bool(m["finite"]) and float(state.loss_scale.scale) == 1024.0
    state, m = sharded.train_step(state, _batch(sharded, cfg, 4))
    assert float(state.loss_scale.scale) == 2048.0 and int(state.loss_scale.good_steps) == 0
    after2 = jax.device_get(state.params)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(after2)))
    assert int(state.loss_scale.skipped) == 1


def test_fp16_resume_keeps_the_scale(tmp_path):
    whole = _fp16(tmp_path / "whole", "train.loss_scale_window=2", "train.steps=6")
    train(whole, progress=False)
    split = dataclasses.replace(whole, train=dataclasses.replace(whole.train, run_dir=str(tmp_path / "split")))
    train(split, stop_after=3, progress=False)
    meta = json.loads((tmp_path / "split" / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert meta["loss_scale"] == {"scale": 65536.0, "good_steps": 1, "skipped": 0}
    train(split, progress=False)
    for key in ("loss", "loss_scale", "skipped"):
        assert _losses(tmp_path / "split", key) == _losses(tmp_path / "whole", key)
    assert _losses(tmp_path / "whole", "loss_scale") == {
        1: 32768.0,
        2: 32768.0,
        3: 65536.0,
        4: 65536.0,
        5: 131072.0,
        6: 131072.0,
    }
