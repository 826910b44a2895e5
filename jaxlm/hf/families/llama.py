"""LLaMA 1/2/3 and the families that share its tensors: Mistral (sliding window) and Qwen2 (q/k/v biases).

RMSNorm pre-norm, SwiGLU, RoPE (rotate-half, as jaxlm's), GQA. Both RoPE implementations rotate halves, so
q/k need no permutation.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import HF_ACTIVATION, PLAIN_BLOCK, ROPE_KEYS, max_positions, mismatches, rope_params, rope_to_hf

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
CONFIG_CLASSES = ("LlamaConfig", "MistralConfig", "Qwen2Config")
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    attention_bias mlp_bias pretraining_tp sliding_window use_sliding_window max_window_layers layer_types
    """.split()
)
NEUTRAL = frozenset({"max_sequence_length"})  # LLaMA 1 conversions: the context length, unused by the model

DECODER_TOP = [
    ("model.embed_tokens.weight", ("embed", "embedding"), "vector"),
    ("model.norm.weight", ("stack", "final_norm", "scale"), "vector"),
    ("lm_head.weight", ("lm_head",), "linear"),
]
ATTENTION = [
    ("input_layernorm.weight", ("attn_norm", "scale"), "vector"),
    ("self_attn.q_proj.weight", ("attn", "wq"), "linear_to_heads"),
    ("self_attn.k_proj.weight", ("attn", "wk"), "linear_to_heads"),
    ("self_attn.v_proj.weight", ("attn", "wv"), "linear_to_heads"),
    ("self_attn.o_proj.weight", ("attn", "wo"), "linear_from_heads"),
    ("self_attn.q_proj.bias", ("attn", "bq"), "bias_heads"),
    ("self_attn.k_proj.bias", ("attn", "bk"), "bias_heads"),
    ("self_attn.v_proj.bias", ("attn", "bv"), "bias_heads"),
    ("self_attn.o_proj.bias", ("attn", "bo"), "vector"),
]
MLP = [
    ("mlp.gate_proj.weight", ("mlp", "w_gate"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "w_up"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "w_out"), "linear"),
]
LAYER = ATTENTION + [("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector")] + MLP


def layout(cfg: ModelConfig, arch: str):
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def decoder_fields(r, act_key: str = "hidden_act", act_default: str = "silu") -> dict:
    """The ModelConfig fields every LLaMA-like config.json spells the same way."""
    d, n = r.get("hidden_size"), r.get("num_attention_heads")
    return dict(
        vocab_size=r.get("vocab_size"),
        d_model=d,
        num_layers=r.get("num_hidden_layers"),
        num_heads=n,
        num_kv_heads=r.get("num_key_value_heads", n),
        head_dim=r.get("head_dim", None) or d // n,
        mlp_dim=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        position="rope",
        norm="rmsnorm",
        norm_eps=r.get("rms_norm_eps", 1e-6),
        mlp="gated",
        activation=r.activation(act_key, act_default),
        norm_bias=False,
        attention_dropout=float(r.get("attention_dropout", 0.0)),  # these models have no residual dropout
        init_std=r.get("initializer_range", 0.02),
    )


def full_attention_only(r, arch: str) -> None:
    """Qwen2/Qwen3: their per-layer sliding window (use_sliding_window) is not supported."""
    r.expect("use_sliding_window", (False,), False)
    r.get("sliding_window", None)  # used only with use_sliding_window
    r.get("max_window_layers", None)
    types = set(r.get("layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ConfigError(f"{arch}: layer_types {sorted(types)} are not supported (full_attention only)")


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    if arch == "LlamaForCausalLM":
        fields["qkv_bias"] = fields["out_bias"] = bool(r.get("attention_bias", False))
        fields["mlp_bias"] = bool(r.get("mlp_bias", False))
        r.expect("pretraining_tp", (1,), 1)
    elif arch == "MistralForCausalLM":
        fields["sliding_window"] = r.get("sliding_window", None) or 0
    else:  # Qwen2
        fields["qkv_bias"] = True
        full_attention_only(r, arch)
    tied = bool(r.get("tie_word_embeddings", False))
    return ModelConfig(**fields, tie_embeddings=tied, **rope_params(r))


LLAMA_LIKE = dict(position="rope", norm="rmsnorm", mlp="gated", norm_position="pre")
LLAMA_LIKE.update(embed_scale=False, post_norms=False, qk_norm=False, norm_offset=0.0, causal=True, head="lm")
LLAMA_LIKE.update(attn_logit_softcap=0.0, final_logit_softcap=0.0, scale_readout=False, embed_norm=False)
LLAMA_LIKE.update(attention_scale=0.0, global_every=0, rope_local_theta=0.0, type_vocab_size=0, pooler=False)
LLAMA_LIKE.update(PLAIN_BLOCK)


def architecture(cfg: ModelConfig):
    """(architecture, problems) when cfg is LLaMA-like, else None."""
    if cfg.position != "rope" or cfg.qk_norm or cfg.post_norms or cfg.decoder_layers or not cfg.causal:
        return None
    problems = mismatches(cfg, {**LLAMA_LIKE, "mlp_bias": False}, "LLaMA")
    if cfg.sliding_window:
        arch = "MistralForCausalLM"
        if cfg.qkv_bias or cfg.out_bias:
            problems.append("attention biases with a sliding window")
    elif cfg.qkv_bias and not cfg.out_bias:
        arch = "Qwen2ForCausalLM"
    else:
        arch = "LlamaForCausalLM"
        if cfg.qkv_bias != cfg.out_bias:
            problems.append("an output bias without q/k/v biases")
    return arch, problems


def decoder_config(cfg: ModelConfig) -> dict:
    """The config.json keys every LLaMA-like family spells the same way."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": max_positions(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": cfg.attention_dropout,
    }


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": HF_ACTIVATION[cfg.activation], "rope_parameters": rope_to_hf(cfg)}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    else:
        out["use_sliding_window"] = False
    return out
