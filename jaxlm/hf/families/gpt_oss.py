"""gpt-oss: a mixture of experts with attention sinks, sliding-window and global layers alternating, biases on
every projection and on the router, YaRN RoPE without truncation, and a clamped SwiGLU
((up + 1) * gate * sigmoid(1.702 gate), gate <= 7, |up| <= 7). Its experts are stored fused: gate_up_proj
(E, D, 2F) with gate and up interleaved along the last axis, down_proj (E, F, D), both already (in, out)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import ROPE_KEYS, global_every, layer_types, mismatches, rope_params, rope_to_hf
from jaxlm.hf.families.llama import ATTENTION, DECODER_TOP, LLAMA_LIKE, decoder_config, decoder_fields

MOE = True
ARCHITECTURES = {"GptOssForCausalLM": "gpt_oss"}
CONFIG_CLASSES = ("GptOssConfig",)
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps tie_word_embeddings attention_dropout initializer_range
    attention_bias sliding_window layer_types num_local_experts num_experts_per_tok router_aux_loss_coef
    swiglu_alpha swiglu_limit hidden_act
    """.split()
)  # hidden_act is read (as every LLaMA-like family's) and overridden: the experts compute their own SwiGLU
NEUTRAL = frozenset({"output_router_logits"})
SWIGLU_ALPHA = 1.702  # sigmoid(1.702 x): jaxlm's quick_gelu

LAYER = ATTENTION + [
    ("self_attn.sinks", ("attn", "sinks"), "vector"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ("mlp.router.weight", ("moe", "router"), "linear"),
    ("mlp.router.bias", ("moe", "router_bias"), "vector"),
    ("mlp.experts.gate_up_proj", [("moe", "w_gate"), ("moe", "w_up")], "interleaved_pair"),
    ("mlp.experts.gate_up_proj_bias", [("moe", "b_gate"), ("moe", "b_up")], "interleaved_pair"),
    ("mlp.experts.down_proj", ("moe", "w_out"), "vector"),
    ("mlp.experts.down_proj_bias", ("moe", "b_out"), "vector"),
]
GPT_OSS = dict(
    attention_sinks=True,
    router_bias=True,
    mlp_bias=True,
    activation="quick_gelu",
    mlp_up_shift=1.0,
    router="softmax",
    router_normalize=True,
    router_scale=1.0,
    shared_experts=0,
)

# transformers keeps each layer's experts fused in `mlp.experts` (gate_up_proj, down_proj): how peft adapts them
PEFT_EXPERTS = "interleaved"  # gate_up_proj (E, D, 2F): gate and up columns alternate


def layout(cfg: ModelConfig, arch: str):
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    alpha = float(r.get("swiglu_alpha", SWIGLU_ALPHA))
    if abs(alpha - SWIGLU_ALPHA) > 1e-9:
        raise ConfigError(f"{arch}: swiglu_alpha={alpha} is not supported (jaxlm implements {SWIGLU_ALPHA})")
    bias = bool(r.get("attention_bias", True))
    layers = fields["num_layers"]
    types = r.get("layer_types", None) or ["sliding_attention", "full_attention"] * (layers // 2) + [
        "sliding_attention"
    ] * (layers % 2)
    every = global_every(types, arch, layers)
    window = r.get("sliding_window", None) or 0 if every is not None else 0
    if every is not None and not window:
        raise ConfigError(f"{arch}: layer_types has sliding layers but sliding_window is not set")
    return ModelConfig(
        **{**fields, **GPT_OSS},
        qkv_bias=bias,
        out_bias=bias,
        sliding_window=window,
        global_every=every or 0,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        num_experts=r.get("num_local_experts"),
        experts_per_token=r.get("num_experts_per_tok"),
        expert_mlp_dim=fields["mlp_dim"],
        mlp_clamp=float(r.get("swiglu_limit", 7.0)),
        aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
        **rope_params(r),
    )


def architecture(cfg: ModelConfig):
    if not cfg.num_experts or not cfg.attention_sinks or not cfg.causal or cfg.decoder_layers:
        return None
    want = {**LLAMA_LIKE, **GPT_OSS, "mlp": "gated"}
    del want["mlp_clamp"], want["global_every"]  # any clamp; every other layer sliding, checked below
    problems = mismatches(cfg, want, "gpt-oss")
    if cfg.qkv_bias != cfg.out_bias:
        problems.append("q/k/v biases differ from the output bias")
    if cfg.global_every not in (0, 2) and cfg.sliding_window:
        problems.append("sliding-window layers other than every other one")
    return "GptOssForCausalLM", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": "silu", "rope_parameters": rope_to_hf(cfg)}
    out["intermediate_size"] = cfg.expert_hidden  # the experts' width (the model has no dense MLP)
    out.update(attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window or None)
    out.update(layer_types=layer_types(cfg), num_local_experts=cfg.num_experts)
    out.update(num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.aux_loss_weight)
    return {**out, "swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": cfg.mlp_clamp}
