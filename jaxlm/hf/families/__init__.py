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
Families are tried in this order when choosing how to write a model: LLaMA before Phi-3, which it can also
write.
"""

from __future__ import annotations

import logging
from types import ModuleType

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import Reader
from jaxlm.hf.families import bert, gemma, gpt2, llama, phi3, qwen3, t5

log = logging.getLogger(__name__)

FAMILIES: tuple[ModuleType, ...] = (llama, qwen3, gemma, phi3, gpt2, bert, t5)
ARCHITECTURES = {arch: fam for fam in FAMILIES for arch in fam.ARCHITECTURES}
MODEL_TYPES = {mt: arch for fam in FAMILIES for arch, mt in reversed(fam.ARCHITECTURES.items())}


def family_of(arch: str) -> ModuleType:
    return ARCHITECTURES[arch]


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
    fam = family_of(arch)
    r = Reader(hf, arch, frozenset(fam.KEYS), frozenset(fam.NEUTRAL))
    cfg = fam.config_from_hf(r, arch, tensor_names)
    r.finish()
    return cfg, arch


def architecture_for(cfg: ModelConfig, requested: str | None = None) -> str:
    """The HF class that computes what `cfg` does (or checks that `requested` does); ConfigError when none."""
    if requested is not None and requested not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {requested!r}; jaxlm writes {sorted(ARCHITECTURES)}")
    first = None
    for fam in FAMILIES:
        if requested is not None and requested not in fam.ARCHITECTURES:
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
    fam = family_of(arch)
    for field in getattr(fam, "UNWRITTEN_DROPOUT", ("dropout", "mlp_dropout")):
        if getattr(cfg, field):
            log.warning("%s has no such dropout: model.%s %s is not written", arch, field, getattr(cfg, field))
    ids = {"architectures": [arch], "model_type": fam.ARCHITECTURES[arch]}
    ids.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None)  # None: not a class default (Phi-3's 32000)
    body = fam.config_to_hf(cfg, arch, eos_id) if fam is t5 else fam.config_to_hf(cfg, arch)
    return {**ids, **body}
