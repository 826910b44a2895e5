"""The registry of Hugging Face model families: one module per family, each holding everything it needs.

A family module defines:
  ARCHITECTURES    {HF class name: model_type} it reads (and writes).
  CONFIG_CLASSES   the transformers config classes whose attributes it answers for (a test walks them).
  KEYS             the config.json keys it maps or checks; NEUTRAL: the keys it knows not to change the math.
  layout(cfg, arch) -> (top-level tensors, layer stacks): HF names <-> jaxlm parameter paths and layouts.
  config_from_hf(reader, arch, tensor_names) -> ModelConfig.
  architecture(cfg) -> None (not this family), or (HF class, [reasons it cannot be written]).
  config_to_hf(cfg, arch) -> config.json dict (without the keys every file carries).
  UNWRITTEN_DROPOUT (optional): ModelConfig dropout fields the family's config.json cannot hold.
  MOE (optional): True for a mixture-of-experts family, tried only for configs with experts (dense families
    only for configs without).
  PEFT_EXPERTS (optional, MoE families): how transformers' fused `mlp.experts.gate_up_proj` holds gate and up,
    "concatenated" (E, 2F, D) or "interleaved" (E, D, 2F): peft's LoRAs of the experts (`jaxlm.hf.peft`).
Families are tried in this order when choosing how to write a model: LLaMA before Phi-3, which it can also
write.
"""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import Reader
from jaxlm.hf.families import bert, deepseek, gemma, gpt2, gpt_oss, llama, mixtral, phi3, qwen3, qwen_moe, t5

log = logging.getLogger(__name__)
# Mixture-of-experts fields that shape training only (decoding is dropless, the losses and the balance update act
# on gradients and the selection bias): written models leave them out, with a warning.
TRAINING_ONLY = ("capacity_factor", "router_z_loss_weight", "router_balance_rate")

FAMILIES: tuple[ModuleType, ...] = (llama, qwen3, gemma, phi3, gpt2, bert, t5, mixtral, qwen_moe, gpt_oss, deepseek)
MODEL_TYPES = {mt: arch for fam in FAMILIES for arch, mt in reversed(fam.ARCHITECTURES.items())}
# Reward models (model.head=score): a decoder family's ...ForSequenceClassification holds its causal class's
# tensors, with `score.weight` (num_labels, D) in place of the read-out; transformers scores the last token that
# is not pad_token_id.
SCORE_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "Gemma2ForSequenceClassification": "Gemma2ForCausalLM",
    "Gemma3TextForSequenceClassification": "Gemma3ForCausalLM",
    "Phi3ForSequenceClassification": "Phi3ForCausalLM",
    "GPT2ForSequenceClassification": "GPT2LMHeadModel",
}
_SCORED = {lm: score for score, lm in SCORE_ARCHITECTURES.items()}
ARCHITECTURES = {arch: fam for fam in FAMILIES for arch in fam.ARCHITECTURES}
ARCHITECTURES.update({score: ARCHITECTURES[lm] for score, lm in SCORE_ARCHITECTURES.items()})


def family_of(arch: str) -> ModuleType:
    return ARCHITECTURES[arch]


def lm_architecture(arch: str) -> str:
    """The causal class whose tensors and config a class holds (itself, unless it is a reward model's)."""
    return SCORE_ARCHITECTURES.get(arch, arch)


def layout(cfg: ModelConfig, arch: str):
    """(top-level tensors, layer stacks) of `arch` (see the families' `layout`)."""
    lm = lm_architecture(arch)
    if lm == arch:
        return family_of(arch).layout(cfg, arch)
    top, stacks = family_of(lm).layout(dataclasses.replace(cfg, head="lm"), lm)
    return [t for t in top if t[1] != ("lm_head",)] + [("score.weight", ("score",), "linear")], stacks


def architecture_of(hf: dict) -> str:
    """The HF class a config.json describes: its `architectures`, else its `model_type`."""
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    raise ConfigError(
        f"unsupported Hugging Face architecture {archs or hf.get('model_type')!r}; jaxlm reads {sorted(ARCHITECTURES)}"
    )


def config_from_hf(hf: dict, tensor_names=()) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) for a config.json dict and the checkpoint's tensor names (which tell
    whether T5's read-out has its own matrix). ConfigError names any key jaxlm cannot honour."""
    arch = architecture_of(hf)
    fam, lm = family_of(arch), lm_architecture(arch)
    r = Reader(hf, arch, frozenset(fam.KEYS), frozenset(fam.NEUTRAL))
    cfg = fam.config_from_hf(r, lm, tensor_names)
    r.finish()
    if lm != arch:  # transformers' default is 2 labels when id2label is absent
        cfg = dataclasses.replace(cfg, head="score", num_labels=len(hf.get("id2label") or {0: 0, 1: 1}))
    return cfg, arch


def architecture_for(cfg: ModelConfig, requested: str | None = None) -> str:
    """The HF class that computes what `cfg` does (or checks that `requested` does); ConfigError when none."""
    if requested is not None and requested not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {requested!r}; jaxlm writes {sorted(ARCHITECTURES)}")
    if cfg.head == "score":  # a reward model: the causal class of the same trunk, as its ...ForSequenceClassification
        if requested is not None and requested not in SCORE_ARCHITECTURES:
            raise ConfigError(f"a reward model (model.head=score) is written as one of {sorted(SCORE_ARCHITECTURES)}")
        lm = architecture_for(dataclasses.replace(cfg, head="lm"), requested and SCORE_ARCHITECTURES[requested])
        if lm not in _SCORED:
            raise ConfigError(f"transformers has no sequence-classification class for {lm}")
        return _SCORED[lm]
    first = None
    for fam in FAMILIES:
        if requested is not None and requested not in fam.ARCHITECTURES:
            continue
        if getattr(fam, "MOE", False) != bool(cfg.num_experts):
            continue
        found = fam.architecture(cfg)
        if found is None:
            continue
        arch, problems = found
        if requested is not None and arch != requested:
            raise ConfigError(f"the model is a {arch}, not a {requested}")
        if not problems:
            return arch
        first = first or (arch, problems)
    if first is None:
        where = requested or f"any of {sorted(ARCHITECTURES)}"
        raise ConfigError(f"no Hugging Face class implements this model (position={cfg.position!r}) among {where}")
    raise ConfigError(f"the model cannot be written as {first[0]}: " + "; ".join(first[1]))


def config_to_hf(cfg: ModelConfig, arch: str, *, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json dict for `cfg` as `arch`."""
    fam, lm = family_of(arch), lm_architecture(arch)
    for field in getattr(fam, "UNWRITTEN_DROPOUT", ("dropout", "mlp_dropout")):
        if getattr(cfg, field):
            log.warning("%s has no such dropout: model.%s %s is not written", arch, field, getattr(cfg, field))
    for field in TRAINING_ONLY:  # how training routes and balances, not what the trained model computes
        if getattr(cfg, field):
            log.warning("%s has no such setting: model.%s %s is not written", arch, field, getattr(cfg, field))
    ids = {"architectures": [arch], "model_type": fam.ARCHITECTURES[lm]}
    ids.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None)  # None: not a class default (Phi-3's 32000)
    if lm != arch:
        # transformers scores the last token that is not pad_token_id: jaxlm's reward inputs end without end-of-text,
        # so padding with it leaves the same last token.
        labels = {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
        ids.update(pad_token_id=eos_id, id2label=labels, label2id={v: k for k, v in labels.items()})
        cfg = dataclasses.replace(cfg, head="lm")
    body = fam.config_to_hf(cfg, lm, eos_id) if fam is t5 else fam.config_to_hf(cfg, lm)
    return {**ids, **body}
