"""Qwen2-MoE and Qwen3-MoE: Qwen2's and Qwen3's attention with a sparse mixture of experts in every layer
(softmax router, top-k, renormalised with norm_topk_prob); Qwen2-MoE adds a shared expert scaled by a sigmoid
gate. One tensor an expert on disk."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import HF_ACTIVATION, ROPE_KEYS, mismatches, rope_params, rope_to_hf
from jaxlm.hf.families.gemma import QK_NORM
from jaxlm.hf.families.llama import ATTENTION, DECODER_TOP, LLAMA_LIKE, decoder_config, decoder_fields
from jaxlm.hf.families.mixtral import MOE_DEFAULTS

MOE = True
ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "Qwen2MoeForCausalLM": "qwen2_moe"}
CONFIG_CLASSES = ("Qwen3MoeConfig", "Qwen2MoeConfig")
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    attention_bias qkv_bias use_sliding_window sliding_window max_window_layers layer_types
    num_experts num_local_experts num_experts_per_tok moe_intermediate_size norm_topk_prob decoder_sparse_step
    mlp_only_layers router_aux_loss_coef shared_expert_intermediate_size
    """.split()
)
# transformers keeps each layer's experts fused in `mlp.experts` (gate_up_proj, down_proj): how peft adapts them
PEFT_EXPERTS = "concatenated"  # gate_up_proj (E, 2F, D): the gate's F rows, then the up's
NEUTRAL = frozenset({"output_router_logits"})

EXPERTS = [
    ("mlp.gate.weight", ("moe", "router"), "linear"),
    ("mlp.experts.{e}.gate_proj.weight", ("moe", "w_gate"), "linear"),
    ("mlp.experts.{e}.up_proj.weight", ("moe", "w_up"), "linear"),
    ("mlp.experts.{e}.down_proj.weight", ("moe", "w_out"), "linear"),
]
SHARED = [
    ("mlp.shared_expert.gate_proj.weight", ("moe", "shared", "w_gate"), "linear"),
    ("mlp.shared_expert.up_proj.weight", ("moe", "shared", "w_up"), "linear"),
    ("mlp.shared_expert.down_proj.weight", ("moe", "shared", "w_out"), "linear"),
    ("mlp.shared_expert_gate.weight", ("moe", "shared_gate"), "linear"),
]
POST = [("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector")]


def layout(cfg: ModelConfig, arch: str):
    layer = ATTENTION + POST + EXPERTS + (QK_NORM if arch == "Qwen3MoeForCausalLM" else SHARED)
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), layer, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    qwen3 = arch == "Qwen3MoeForCausalLM"
    bias = bool(r.get("attention_bias", False)) if qwen3 else bool(r.get("qkv_bias", True))
    if r.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=true is not supported (full attention only)")
    for key in ("sliding_window", "max_window_layers", "layer_types"):
        r.get(key, None)  # used only with use_sliding_window
    if r.get("decoder_sparse_step", 1) != 1 or r.get("mlp_only_layers", None):
        raise ConfigError(
            f"{arch}: decoder_sparse_step={r.get('decoder_sparse_step', 1)}, mlp_only_layers="
            f"{r.get('mlp_only_layers', None)}: dense layers among the expert layers are not supported yet"
        )
    experts = r.get("num_experts", None) or r.get("num_local_experts")
    F = r.get("moe_intermediate_size")
    moe = dict(num_experts=experts, experts_per_token=r.get("num_experts_per_tok"), expert_mlp_dim=F)
    moe.update(router_normalize=bool(r.get("norm_topk_prob", False)))
    moe.update(aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)))
    if not qwen3:
        shared = r.get("shared_expert_intermediate_size")
        if shared % F:
            raise ConfigError(
                f"{arch}: shared_expert_intermediate_size ({shared}) is not a multiple of moe_intermediate_size ({F})"
            )
        moe.update(shared_experts=shared // F, shared_expert_gate=True)
    tied = bool(r.get("tie_word_embeddings", False))
    attention = dict(qkv_bias=bias, out_bias=bias and qwen3, qk_norm=qwen3)
    return ModelConfig(**fields, **attention, tie_embeddings=tied, **moe, **rope_params(r))


def architecture(cfg: ModelConfig):
    if not cfg.num_experts or cfg.position != "rope" or not cfg.causal or cfg.decoder_layers:
        return None
    want = {**LLAMA_LIKE, **MOE_DEFAULTS, "mlp_bias": False, "sliding_window": 0}
    del want["qkv_bias"], want["out_bias"], want["qk_norm"]
    if cfg.qk_norm:  # Qwen3-MoE: no shared experts
        arch, problems = "Qwen3MoeForCausalLM", mismatches(cfg, {**want, "qk_norm": True}, "Qwen3-MoE")
        if cfg.qkv_bias != cfg.out_bias:
            problems.append("q/k/v biases differ from the output bias")
        return arch, problems
    if not cfg.shared_experts:
        return None  # Mixtral's
    want.update(shared_expert_gate=True, qkv_bias=True, out_bias=False)
    del want["shared_experts"]
    return "Qwen2MoeForCausalLM", mismatches(cfg, want, "Qwen2-MoE")


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": HF_ACTIVATION[cfg.activation], "rope_parameters": rope_to_hf(cfg)}
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token)
    out.update(moe_intermediate_size=cfg.expert_hidden, norm_topk_prob=cfg.router_normalize)
    out.update(decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.aux_loss_weight)
    out.update(use_sliding_window=False)
    if arch == "Qwen3MoeForCausalLM":
        return {**out, "attention_bias": cfg.qkv_bias}
    return {**out, "qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_experts * cfg.expert_hidden}
