"""jaxlm: the language-model stack as readable, fast, tested JAX."""

from jaxlm.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from jaxlm.nn.transformer import TransformerLM
from jaxlm.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "TransformerLM",
    "ModelConfig",
    "TrainConfig",
    "get_preset",
    "load_config",
]
