"""Typed configuration: frozen dataclasses are the schema, YAML files are instances.

`load_config("configs/llama_tiny.yaml", ["model.num_layers=4"])` reads the YAML,
applies dotted `key=value` overrides (values parsed as YAML scalars), and builds
`Config`. Unknown keys, wrong types and impossible combinations raise
`ConfigError` naming the key, before any model is built or compiled.

- `model`: `ModelConfig` and the published shapes (`PRESETS`);
- `sections`: the run sections (data, train, finetune, peft, align, mesh) and their choices;
- `checks`: the checks across sections, one named function each;
- `run`: `Config`, the whole run;
- `io`: YAML and dotted overrides in, YAML out.
"""

from jaxlm.config.io import from_dict, load_config, parse_overrides, save_config, to_dict
from jaxlm.config.model import PRESETS, ModelConfig, get_preset
from jaxlm.config.run import Config
from jaxlm.config.sections import (
    ALIGNMENT_OBJECTIVES,
    DPO_LOSSES,
    INSTRUCTION_OBJECTIVES,
    KL_ESTIMATORS,
    LORA_TARGETS,
    MESH_AXES,
    OBJECTIVES,
    PEFT_METHODS,
    PRECISION_DTYPES,
    PREFERENCE_OBJECTIVES,
    RL_OBJECTIVES,
    TEXT_OBJECTIVES,
    AlignConfig,
    DataConfig,
    FinetuneConfig,
    MeshConfig,
    MixtureSource,
    PeftConfig,
    TrainConfig,
)
from jaxlm.errors import ConfigError

__all__ = [
    "ALIGNMENT_OBJECTIVES",
    "DPO_LOSSES",
    "INSTRUCTION_OBJECTIVES",
    "KL_ESTIMATORS",
    "LORA_TARGETS",
    "MESH_AXES",
    "OBJECTIVES",
    "PEFT_METHODS",
    "PRECISION_DTYPES",
    "PREFERENCE_OBJECTIVES",
    "PRESETS",
    "RL_OBJECTIVES",
    "TEXT_OBJECTIVES",
    "AlignConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "MeshConfig",
    "MixtureSource",
    "ModelConfig",
    "PeftConfig",
    "TrainConfig",
    "from_dict",
    "get_preset",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]
