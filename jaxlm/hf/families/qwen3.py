"""Qwen3 (dense): LLaMA's tensors plus RMSNorms over head_dim of queries and keys, applied before RoPE."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import HF_ACTIVATION, ROPE_KEYS, mismatches, rope_params, rope_to_hf
from jaxlm.hf.families.gemma import QK_NORM
from jaxlm.hf.families.llama import (
    DECODER_TOP,
    LAYER,
    LLAMA_LIKE,
    decoder_config,
    decoder_fields,
    full_attention_only,
)

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3"}
CONFIG_CLASSES = ("Qwen3Config",)
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    attention_bias use_sliding_window sliding_window max_window_layers layer_types
    """.split()
)
NEUTRAL = frozenset()


def layout(cfg: ModelConfig, arch: str):
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), LAYER + QK_NORM, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    fields["qkv_bias"] = fields["out_bias"] = bool(r.get("attention_bias", False))
    full_attention_only(r, arch)
    tied = bool(r.get("tie_word_embeddings", False))
    return ModelConfig(**fields, tie_embeddings=tied, qk_norm=True, **rope_params(r))


def architecture(cfg: ModelConfig):
    if cfg.position != "rope" or not cfg.qk_norm or cfg.post_norms or not cfg.causal or cfg.decoder_layers:
        return None
    problems = mismatches(cfg, {**LLAMA_LIKE, "qk_norm": True, "mlp_bias": False, "sliding_window": 0}, "Qwen3")
    if cfg.qkv_bias != cfg.out_bias:
        problems.append("q/k/v biases differ from the output bias")
    return "Qwen3ForCausalLM", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": HF_ACTIVATION[cfg.activation], "rope_parameters": rope_to_hf(cfg)}
    return {**out, "attention_bias": cfg.qkv_bias, "use_sliding_window": False}
