"""`jaxlm convert`: Hugging Face model or peft adapter directory <-> jaxlm run directory."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxlm.config import Config, ConfigError, DataConfig, FinetuneConfig, TrainConfig, save_config
from jaxlm.data.tokenizer import DataError
from jaxlm.hf.io import from_hf, to_hf
from jaxlm.train.checkpoint import Checkpointer, CheckpointMeta
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.run_dir import RunDir, load_run


def _new_run(out) -> RunDir:
    run = RunDir(out)
    if run.has_checkpoint() or run.config.exists():
        raise ConfigError(f"{run.path} already holds a run; choose a new --out (nothing was overwritten)")
    return run


def _write_run(run: RunDir, cfg: Config, tokenizer, params: nnx.State, source: str) -> None:
    """config.yaml, tokenizer.json and checkpoint 0 (the given parameters, fresh optimizer state)."""
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config)
    tokenizer.save(run.tokenizer)
    opt_state = make_optimizer(cfg.train).init(params)
    meta = CheckpointMeta(step=0, rng=np.asarray(jax.random.PRNGKey(cfg.train.seed)).tolist(), source=source)
    ckpt = Checkpointer(run.checkpoints, keep=cfg.train.keep_checkpoints)
    ckpt.save(0, params, opt_state, meta, force=True)
    ckpt.close()


def _objective(m) -> str:
    return "span" if m.decoder_layers else "clm" if m.causal else "mlm"


def hf_to_run(hf_dir: str | Path, out: str | Path, *, base: str | Path | None = None) -> tuple[str, int]:
    """A Hugging Face model directory, or a peft adapter directory (with its base), as a run directory.

    Returns (what was read, checkpoint step)."""
    from jaxlm.hf.peft import is_adapter_dir

    run = _new_run(out)
    if is_adapter_dir(hf_dir):
        return _adapter_to_run(Path(hf_dir), run, base), 0
    if base is not None:
        raise ConfigError(f"--base is for peft adapter directories; {hf_dir} has no adapter_config.json")
    model, tokenizer, arch = from_hf(hf_dir)
    if tokenizer is None:
        raise DataError(f"{hf_dir} has no tokenizer.json; a run directory needs the model's tokenizer")
    _model_run(run, model, tokenizer, arch)
    return arch, 0


def gguf_to_run(path: str | Path, out: str | Path) -> str:
    """A GGUF file as a run directory (float32); returns its architecture. The file is read in full before
    anything is written."""
    from jaxlm.hf.gguf import from_gguf

    run = _new_run(out)
    model, tokenizer, arch = from_gguf(path)
    _model_run(run, model, tokenizer, f"{arch} (GGUF {Path(path).name})")
    return arch


def _model_run(run: RunDir, model, tokenizer, source: str) -> None:
    m = model.cfg
    cfg = Config(
        model=m,
        data=DataConfig(tokenizer="bpe", seq_len=min(1024, m.max_seq_len)),
        train=TrainConfig(run_dir=str(run.path), batch_size=8, lr=1e-5, warmup_steps=10, objective=_objective(m)),
    )
    _write_run(run, cfg, tokenizer, nnx.state(model, nnx.Param), source)


def _adapter_to_run(adapter: Path, run: RunDir, base) -> str:
    """A run of the adapter on its base: finetune.init_from names the base, the checkpoint holds the adapter."""
    from jaxlm.hf.families import architecture_for
    from jaxlm.hf.peft import load_adapter, read_adapter_config
    from jaxlm.nn.adapters import Adapter
    from jaxlm.nn.models import build_model
    from jaxlm.train.run_dir import load_base

    named = read_adapter_config(adapter).get("base_model_name_or_path")
    base = base or named
    if not base or not Path(base).expanduser().is_dir():
        raise DataError(
            f"{adapter} is a peft adapter; its base ({named!r}) is not a local directory: pass --base DIR "
            "(a Hugging Face model directory or a jaxlm run directory)"
        )
    b = load_base(str(base))
    model = build_model(b.model, rngs=nnx.Rngs(0))
    nnx.update(model, b.params)
    arch = architecture_for(b.model)
    pc = load_adapter(model, adapter, arch=arch, base_weights=False)
    m = b.model
    cfg = Config(
        model=m,
        data=DataConfig(tokenizer="bpe", seq_len=min(1024, m.max_seq_len)),
        train=TrainConfig(run_dir=str(run.path), batch_size=8, lr=1e-4, warmup_steps=10, objective=_objective(m)),
        finetune=FinetuneConfig(init_from=str(Path(base).expanduser().resolve())),
        peft=pc,
    )
    _write_run(run, cfg, b.tokenizer, nnx.state(model, Adapter), f"peft {pc.method} adapter {adapter}")
    return f"peft {pc.method} adapter on {b.source}"


def run_to_hf(run_dir: str | Path, out: str | Path, *, merge: bool = False) -> str:
    """The run's latest checkpoint as a Hugging Face directory: the model, or for a PEFT run its peft adapter
    (merge=True: LoRA merged into full weights). Returns what was written."""
    cfg, tokenizer, model, _ = load_run(run_dir)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    hf_tokenizer = tokenizer if hasattr(tokenizer, "_tok") else None
    method = cfg.peft.method
    if method == "none":
        return to_hf(model, out, tokenizer=hf_tokenizer)
    if merge:
        if method not in ("lora", "qlora"):
            raise ConfigError(f"--merge folds LoRA into the weights; a {method} adapter has no weights to merge into")
        from jaxlm.peft import dequantize
        from jaxlm.peft import merge as merge_lora

        dequantize(model)  # QLoRA: the NF4 base as the model computes it
        merge_lora(model)
        return to_hf(model, out, tokenizer=hf_tokenizer) + f" (LoRA merged, from the {method} run)"
    return _run_adapter_to_hf(cfg, model, out)


def _run_adapter_to_hf(cfg: Config, model, out) -> str:
    from jaxlm.hf.families import architecture_for
    from jaxlm.hf.peft import save_adapter
    from jaxlm.train.run_dir import load_base

    arch = architecture_for(cfg.model)
    base = Path(cfg.finetune.init_from).expanduser()
    b = load_base(str(base))
    if b.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"this run added {cfg.model.vocab_size - b.model.vocab_size} tokens to its base's vocabulary (its chat "
            "template's); a peft adapter cannot hold the new embedding rows: write merged weights with --merge"
        )
    hf_base = str(base.resolve()) if (base / "config.json").is_file() else None
    save_adapter(model, out, cfg.peft, arch=arch, base=hf_base)
    what = f"peft {cfg.peft.method} adapter for {arch}"
    if hf_base is None:
        what += f"; its base is the jaxlm run {base}: write it for peft with `jaxlm convert --to-hf {base} --out DIR`"
    return what


__all__ = ["gguf_to_run", "hf_to_run", "run_to_hf"]
