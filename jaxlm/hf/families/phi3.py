"""Phi-3: LLaMA's math with q, k, v fused in one `qkv_proj` and gate and up in one `gate_up_proj`, residual
dropout, an optional sliding window on every layer, and LongRoPE scaling (short and long factors).

A model that LLaMA can also write exports as LLaMA unless Phi3ForCausalLM is asked for.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import HF_ACTIVATION, ROPE_KEYS, mismatches, rope_params, rope_to_hf
from jaxlm.hf.families.llama import DECODER_TOP, LLAMA_LIKE, decoder_config, decoder_fields

ARCHITECTURES = {"Phi3ForCausalLM": "phi3"}
CONFIG_CLASSES = ("Phi3Config",)
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    original_max_position_embeddings sliding_window resid_pdrop attention_bias
    """.split()
)
NEUTRAL = frozenset({"embd_pdrop"})  # transformers' Phi-3 has no embedding dropout
LAYER = [
    ("input_layernorm.weight", ("attn_norm", "scale"), "vector"),
    ("self_attn.qkv_proj.weight", [("attn", "wq"), ("attn", "wk"), ("attn", "wv")], "linear_qkv"),
    ("self_attn.o_proj.weight", ("attn", "wo"), "linear_from_heads"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ("mlp.gate_up_proj.weight", [("mlp", "w_gate"), ("mlp", "w_up")], "linear_gate_up"),
    ("mlp.down_proj.weight", ("mlp", "w_out"), "linear"),
]


def layout(cfg: ModelConfig, arch: str):
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    r.expect("attention_bias", (False,), False)  # some published files carry it; Phi-3 has no biases
    rope = rope_params(r)
    r.get("original_max_position_embeddings", None)  # LongRoPE's; unused without it
    return ModelConfig(
        **fields,
        **rope,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        sliding_window=r.get("sliding_window", None) or 0,
        dropout=float(r.get("resid_pdrop", 0.0)),
    )


def architecture(cfg: ModelConfig):
    if cfg.position != "rope" or cfg.qk_norm or cfg.post_norms or not cfg.causal or cfg.decoder_layers:
        return None
    want = {**LLAMA_LIKE, "qkv_bias": False, "out_bias": False, "mlp_bias": False}
    return "Phi3ForCausalLM", mismatches(cfg, want, "Phi-3")


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": HF_ACTIVATION[cfg.activation], "rope_parameters": rope_to_hf(cfg)}
    if cfg.rope_scaling == "longrope":
        out["original_max_position_embeddings"] = cfg.rope_original_max_len
    return {**out, "sliding_window": cfg.sliding_window or None, "resid_pdrop": cfg.dropout, "embd_pdrop": 0.0}
