"""jaxlm: the language-model stack as readable, fast, tested JAX.

The names below load on first use (PEP 562), so `import jaxlm.ops` stays as light as the ops themselves.
"""

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Config": "jaxlm.config",
    "ConfigError": "jaxlm.config",
    "DataConfig": "jaxlm.config",
    "MeshConfig": "jaxlm.config",
    "ModelConfig": "jaxlm.config",
    "TrainConfig": "jaxlm.config",
    "load_config": "jaxlm.config",
    "from_gguf": "jaxlm.hf",
    "from_hf": "jaxlm.hf",
    "to_hf": "jaxlm.hf",
    "build_model": "jaxlm.nn.models",
    "EncoderDecoderLM": "jaxlm.nn.seq2seq",
    "TransformerLM": "jaxlm.nn.transformer",
    "PRESETS": "jaxlm.config",
    "get_preset": "jaxlm.config",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])
