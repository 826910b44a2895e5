"""Gemma 2 and Gemma 3 (text): GeGLU, embeddings scaled by sqrt(D), RMSNorm with (1 + w), norms before and
after each branch, sliding-window layers alternating with global ones, attention scaled by
query_pre_attn_scalar^-1/2. Gemma 2 soft-caps attention and final logits; Gemma 3 adds q/k norms and a RoPE
base per layer type (local 10k, global 1M, optionally scaled)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (
    HF_ACTIVATION,
    PLAIN_BLOCK,
    ROPE_KEYS,
    global_every,
    layer_types,
    mismatches,
    rope_params,
    rope_to_hf,
)
from jaxlm.hf.families.llama import (
    ATTENTION,
    DECODER_TOP,
    MLP,
    decoder_config,
    decoder_fields,
)

ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
CONFIG_CLASSES = ("Gemma2Config", "Gemma3TextConfig")
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_activation tie_word_embeddings attention_dropout initializer_range
    attention_bias query_pre_attn_scalar sliding_window layer_types attn_logit_softcapping final_logit_softcapping
    use_bidirectional_attention rope_local_base_freq sliding_window_pattern _sliding_window_pattern
    """.split()
)
# hidden_act: Gemma 1's key, still in Gemma 2 files; transformers' Gemma 2/3 read hidden_activation only.
NEUTRAL = frozenset({"hidden_act"})
QK_NORM = [
    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), "vector"),
    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), "vector"),
]
LAYER = ATTENTION + [
    ("post_attention_layernorm.weight", ("attn_post_norm", "scale"), "vector"),
    ("pre_feedforward_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ("post_feedforward_layernorm.weight", ("mlp_post_norm", "scale"), "vector"),
]
LAYER += MLP


def layout(cfg: ModelConfig, arch: str):
    layer = LAYER + (QK_NORM if cfg.qk_norm else [])
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), layer, cfg.num_layers)]


def _pattern(r, arch: str, layers: int) -> int | None:
    """global_every for the config's layer_types (None: every layer global)."""
    types = r.get("layer_types", None)
    if types is None:  # transformers' defaults: every 2nd layer global (Gemma 2), every 6th (Gemma 3)
        every = 2 if arch == "Gemma2ForCausalLM" else r.get("sliding_window_pattern", None)
        every = every or r.get("_sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    else:  # layer_types overrides the pattern keys
        for key in ("sliding_window_pattern", "_sliding_window_pattern"):
            r.get(key, None)
    return global_every(types, arch, layers)


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    gemma3 = arch == "Gemma3ForCausalLM"
    fields = decoder_fields(r, "hidden_activation", "gelu_pytorch_tanh")
    fields["qkv_bias"] = fields["out_bias"] = bool(r.get("attention_bias", False))
    r.expect("use_bidirectional_attention", (False, None), None)
    every = _pattern(r, arch, fields["num_layers"])
    if every is not None:
        fields.update(sliding_window=r.get("sliding_window"), global_every=every)
    else:
        r.get("sliding_window", None)  # no sliding layer uses it
    attn_cap = r.get("attn_logit_softcapping", None if gemma3 else 50.0)
    if gemma3 and attn_cap is not None:
        raise ConfigError(f"{arch}: attn_logit_softcapping={attn_cap} (transformers' Gemma 3 does not apply it)")
    if gemma3:
        per_type = r.get("rope_parameters", None) or {}
        if per_type and set(per_type) <= {"full_attention", "sliding_attention"}:
            rope = rope_params(r, per_type.get("full_attention") or {}, 1_000_000.0)
            local = rope_params(r, per_type.get("sliding_attention") or {}, 10_000.0)
        else:  # transformers 4.x: rope_theta (+ rope_scaling) global, rope_local_base_freq local
            rope = rope_params(r, theta_default=1_000_000.0)
            local = {"rope_theta": float(r.get("rope_local_base_freq", 10_000.0))}
        if set(local) != {"rope_theta"}:
            raise ConfigError(f"{arch}: scaled RoPE on sliding-window layers is not supported")
        if every is not None:
            rope["rope_local_theta"] = local["rope_theta"]
    else:
        rope = rope_params(r)
    return ModelConfig(
        **fields,
        **rope,
        tie_embeddings=bool(r.get("tie_word_embeddings", True)),
        attention_scale=float(r.get("query_pre_attn_scalar", 256)) ** -0.5,
        embed_scale=True,
        norm_offset=1.0,
        post_norms=True,
        qk_norm=gemma3,
        attn_logit_softcap=float(attn_cap or 0.0),
        final_logit_softcap=float(r.get("final_logit_softcapping", None if gemma3 else 30.0) or 0.0),
    )


GEMMA_LIKE = dict(norm="rmsnorm", mlp="gated", norm_position="pre", mlp_bias=False, embed_scale=True)
GEMMA_LIKE.update(norm_offset=1.0, post_norms=True, head="lm", scale_readout=False, embed_norm=False)
GEMMA_LIKE.update(type_vocab_size=0, pooler=False)
GEMMA_LIKE.update(PLAIN_BLOCK)


def architecture(cfg: ModelConfig):
    if cfg.position != "rope" or not cfg.post_norms or not cfg.causal or cfg.decoder_layers:
        return None
    problems = mismatches(cfg, GEMMA_LIKE, "Gemma")
    if cfg.qkv_bias != cfg.out_bias:
        problems.append("q/k/v biases differ from the output bias")
    if cfg.activation not in HF_ACTIVATION:
        problems.append(f"activation {cfg.activation}")
    if cfg.qk_norm:
        if cfg.attn_logit_softcap:
            problems.append("attn_logit_softcap with q/k norms (Gemma 3 does not soft-cap attention)")
        return "Gemma3ForCausalLM", problems
    if cfg.rope_local_theta:
        problems.append("rope_local_theta without q/k norms (Gemma 2 has one RoPE base)")
    return "Gemma2ForCausalLM", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    scalar = (cfg.attention_scale or cfg.dim_per_head**-0.5) ** -2
    types = layer_types(cfg)
    out = {
        **decoder_config(cfg),
        "hidden_activation": HF_ACTIVATION[cfg.activation],
        "attention_bias": cfg.qkv_bias,
        "query_pre_attn_scalar": int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "sliding_window": cfg.sliding_window or None,
        "layer_types": types,
        "final_logit_softcapping": cfg.final_logit_softcap or None,
        "attn_logit_softcapping": cfg.attn_logit_softcap or None,
        "use_bidirectional_attention": False,
    }
    if arch == "Gemma3ForCausalLM":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta} if cfg.rope_local_theta else None
        out["rope_parameters"] = {"full_attention": rope_to_hf(cfg), "sliding_attention": local or rope_to_hf(cfg)}
    else:
        out["rope_parameters"] = rope_to_hf(cfg)
    return out
