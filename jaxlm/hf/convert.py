"""`jaxlm convert`: Hugging Face model directory <-> jaxlm run directory."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlm.config import Config, ConfigError, DataConfig, TrainConfig, save_config
from jaxlm.data.tokenizer import DataError
from jaxlm.hf.io import from_hf, to_hf
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.run_dir import RunDir, load_run


def hf_to_run(hf_dir: str | Path, out: str | Path) -> tuple[str, int]:
    """Writes a run directory (config, tokenizer, checkpoint 0 with fresh optimizer state)."""
    run = RunDir(out)
    if run.has_checkpoint() or run.config.exists():
        raise ConfigError(f"{run.path} already holds a run; choose a new --out (nothing was overwritten)")
    model, tokenizer, arch = from_hf(hf_dir)
    if tokenizer is None:
        raise DataError(f"{hf_dir} has no tokenizer.json; a run directory needs the model's tokenizer")
    m = model.cfg
    objective = "span" if m.decoder_layers else "clm" if m.causal else "mlm"
    cfg = Config(
        model=model.cfg,
        data=DataConfig(tokenizer="bpe", seq_len=min(1024, model.cfg.max_seq_len)),
        train=TrainConfig(run_dir=str(out), batch_size=8, lr=1e-5, warmup_steps=10, objective=objective),
    )
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    tokenizer.save(run.tokenizer)
    params = nnx.state(model, nnx.Param)
    opt_state = make_optimizer(cfg.train).init(params)
    meta = {"step": 0, "rng": np.asarray(jax.random.PRNGKey(cfg.train.seed)).tolist(), "data": None, "from": arch}
    ckpt = Checkpointer(run.checkpoints, keep=cfg.train.keep_checkpoints)
    ckpt.save(0, params, opt_state, meta, force=True)
    ckpt.close()
    return arch, 0


def run_to_hf(run_dir: str | Path, out: str | Path) -> str:
    _, tokenizer, model, _ = load_run(run_dir)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    return to_hf(model, out, tokenizer=tokenizer if hasattr(tokenizer, "_tok") else None)
