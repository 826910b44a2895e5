"""A run directory: resolved config, tokenizer, metrics and checkpoints.

RUN_DIR/config.yaml      the resolved Config (every field)
RUN_DIR/tokenizer.json   BPE (Hugging Face `tokenizers` format) or a byte marker
RUN_DIR/metrics.jsonl    one JSON object per logged step / evaluation
RUN_DIR/checkpoints/N/   orbax: params, opt_state, meta

and the loaders: `load_model_dir` (the one loader of a run, a PEFT run with its base, a Hugging Face directory
or a GGUF file, checked against what its caller needs), `load_run` (a run directory's config, tokenizer and
model) and `load_base` (what fine-tuning starts from).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxlm.config import Config, ConfigError, ModelConfig, load_config
from jaxlm.data.chat import CHATML, read_template
from jaxlm.data.tokenizer import DataError, Tokenizer, load_tokenizer
from jaxlm.hf import from_gguf, from_hf
from jaxlm.nn.adapters import Adapter
from jaxlm.nn.models import build_model
from jaxlm.peft import apply_peft, loras, merge
from jaxlm.train.checkpoint import Checkpointer, abstract
from jaxlm.train.finetune import fit_head, grow_vocab


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.tokenizer = self.path / "tokenizer.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"

    def has_checkpoint(self) -> bool:
        return self.latest_step() is not None

    def latest_step(self) -> int | None:
        if not self.checkpoints.is_dir():
            return None
        steps = [int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()]
        return max(steps) if steps else None


# Settings that change where or how data is prepared, never which tokens a resumed run reads.
NEUTRAL = frozenset({"data.cache_dir", "data.max_bad_records", "data.tokenizer_sample_mb"})


def check_resumable(saved: Config, new: Config, sections=("model", "data")) -> None:
    """Model and data must match the checkpoint; train and mesh settings may change (e.g. more steps)."""
    diffs = []
    for section in sections:
        a, b = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(new, section))
        diffs += [f"{section}.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and f"{section}.{k}" not in NEUTRAL]
    if diffs:
        raise ConfigError(
            "the run directory holds checkpoints of a different model/data config; use a new "
            "train.run_dir or the saved settings. Differences: " + "; ".join(diffs)
        )


def load_run(path: str | Path) -> tuple[Config, Tokenizer, nnx.Module, int]:
    """Config, tokenizer and model with the latest checkpoint's parameters, and its step."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise DataError(f"run directory not found: {run.path}")
    if not run.config.is_file():
        raise DataError(f"{run.path} is not a jaxlm run directory: {run.config.name} is missing")
    cfg = load_config(run.config)
    tokenizer = load_tokenizer(run.tokenizer)
    if not run.has_checkpoint():
        raise DataError(f"no checkpoint in {run.checkpoints}; train first (jaxlm train)")
    if cfg.peft.method == "none":
        model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(model, nnx.Param)
        rest = None
    else:  # the checkpoint holds adapters: the base comes from finetune.init_from
        model = peft_model(cfg, tokenizer)
        graphdef, params, rest = nnx.split(model, Adapter, ...)
    ckpt = Checkpointer(run.checkpoints, keep=cfg.train.keep_checkpoints)
    params, _, meta = ckpt.restore(abstract(params))
    ckpt.close()
    model = nnx.merge(graphdef, params) if rest is None else nnx.merge(graphdef, params, rest)
    return cfg, tokenizer, model, meta.step


def peft_model(cfg: Config, tokenizer) -> nnx.Module:
    """The base of finetune.init_from with cfg's (freshly initialised) adapters."""
    if not cfg.finetune.init_from:
        raise DataError(f"a peft.method={cfg.peft.method} run needs its base, but finetune.init_from is empty")
    try:
        params = base_params_for(cfg)
    except (DataError, ConfigError) as e:
        raise DataError(f"cannot load this adapter's base model: {e}") from None
    model = build_model(cfg.model, rngs=nnx.Rngs(0))
    try:
        nnx.update(model, params)
    except (ValueError, KeyError) as e:
        raise DataError(f"the base at {cfg.finetune.init_from} does not fit this run's model: {e}") from None
    return apply_peft(model, cfg.peft, seed=cfg.train.seed)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model ready to use, with what it reads and how it was trained."""

    model: nnx.Module
    tokenizer: Tokenizer
    template: str  # the chat template (the run's data.chat_template, the tokenizer's own, or ChatML)
    prefix_lm: bool  # trained with train.objective=prefix_lm: prompts attend bidirectionally
    source: str  # what was read, for messages and metadata: "DIR (step N)", "DIR (Arch)", "FILE (GGUF arch)"
    cfg: Config | None = None  # a jaxlm run's whole config; None for Hugging Face directories and GGUF files


def load_model_dir(path: str | Path, *, what: str, head: str | None = None, generates: bool = False) -> Loaded:
    """The one loader of a jaxlm run directory (a PEFT run with its base), a Hugging Face model directory or a
    GGUF file, checked against what the caller (`what`, named in every error) needs.

    head: the head it must have ("lm" writes text, "score" scores it). generates: a causal model that
    writes text (a language-model head, not bidirectional)."""
    path = Path(path).expanduser()
    hint = (
        "a jaxlm run directory (config.yaml; make the default one with `jaxlm train configs/llama_tiny.yaml`), "
        "a Hugging Face model directory (config.json + model.safetensors) or a GGUF file"
    )
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer, arch = from_gguf(path)
        loaded = Loaded(model, tokenizer, tokenizer.chat_template or CHATML, False, f"{path} (GGUF {arch})")
    elif not path.is_dir():
        raise DataError(f"{what}: {path} does not exist; it should be {hint}")
    elif (path / "config.yaml").is_file():
        cfg, tokenizer, model, step = load_run(path)
        template = read_template(cfg.data.chat_template, tokenizer)
        loaded = Loaded(model, tokenizer, template, cfg.train.objective == "prefix_lm", f"{path} (step {step})", cfg)
    elif (path / "config.json").is_file():
        model, tokenizer, arch = from_hf(path)
        if tokenizer is None:
            raise DataError(f"{what}: {path} has no tokenizer.json; jaxlm needs the model's tokenizer")
        template = getattr(tokenizer, "chat_template", None) or CHATML
        loaded = Loaded(model, tokenizer, template, False, f"{path} ({arch})")
    else:
        raise DataError(f"{what}: {path} has neither config.yaml nor config.json; it should be {hint}")
    m = loaded.model.cfg
    want = "lm" if generates else head
    if want is not None and m.head != want:
        does = "scores text, it does not write it" if m.head == "score" else "writes text, it does not score it"
        raise ConfigError(f"{what}: {path} has a model.head={m.head} model (it {does}); {what} needs model.head={want}")
    if generates and not m.causal:
        raise ConfigError(f"{what}: {path} is a bidirectional model (e.g. BERT); it cannot generate text")
    return loaded


class Base(NamedTuple):
    model: ModelConfig
    tokenizer: object
    params: nnx.State  # the model's Params (host arrays)
    source: str  # what it was read from, for messages and the run's metadata


def load_base(path: str) -> Base:
    """Model config, tokenizer and parameters of what finetune.init_from names (see `load_model_dir`)."""
    loaded = load_model_dir(path, what="finetune.init_from")
    if loaded.cfg is not None and loaded.cfg.peft.method in ("prompt", "prefix", "qlora"):
        raise ConfigError(
            f"finetune.init_from {path}: a {loaded.cfg.peft.method} run is adapters on another base; start from "
            "that base, or from a merged export (`jaxlm convert --to-hf RUN --merge`)"
        )
    model = loaded.model
    if loras(model):  # a LoRA run: its adapters merged into its base
        merge(model)
    return Base(model.cfg, loaded.tokenizer, _host(_base_params(model)), loaded.source)


def _base_params(model) -> nnx.State:
    """The Params of the unadapted model (a merged LoRA run's weights without its adapters)."""
    abstract = nnx.eval_shape(lambda: build_model(model.cfg, rngs=nnx.Rngs(0)))
    wanted = {p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p in wanted]
    return nnx.from_flat_state(flat)


def _host(state: nnx.State) -> nnx.State:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state)


def base_params_for(cfg: Config) -> nnx.State:
    """The parameters of cfg's finetune.init_from as cfg's model takes them: vocabulary grown to cfg's (a chat
    template's tokens), head fitted (a reward model's)."""
    base = load_base(cfg.finetune.init_from)
    as_base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=base.model.vocab_size))
    _, params = grow_vocab(as_base, base.params, cfg.model.vocab_size)
    return fit_head(cfg, params, base.model)
