"""Hugging Face interop: config.json, safetensors and tokenizer.json <-> jaxlm models, one family a file."""

from jaxlm.hf.families import ARCHITECTURES, config_from_hf, config_to_hf
from jaxlm.hf.gguf import from_gguf
from jaxlm.hf.io import from_hf, to_hf

__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "from_gguf", "from_hf", "to_hf"]
