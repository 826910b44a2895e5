"""jaxlm: the language-model stack as readable, fast, tested JAX."""

from jaxlm.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, TrainConfig, load_config
from jaxlm.hf import from_gguf, from_hf, to_hf
from jaxlm.nn.models import build_model
from jaxlm.nn.seq2seq import EncoderDecoderLM
from jaxlm.nn.transformer import TransformerLM
from jaxlm.presets import PRESETS, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "EncoderDecoderLM",
    "MeshConfig",
    "ModelConfig",
    "TrainConfig",
    "TransformerLM",
    "build_model",
    "from_gguf",
    "from_hf",
    "get_preset",
    "load_config",
    "to_hf",
]
