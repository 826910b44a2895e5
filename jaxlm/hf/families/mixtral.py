"""Mixtral: Mistral's attention and norms with a sparse mixture of experts in place of the MLP (softmax router,
top-k, renormalised weights); one tensor an expert on disk (w1 gate, w3 up, w2 down)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import HF_ACTIVATION, ROPE_KEYS, mismatches, rope_params, rope_to_hf
from jaxlm.hf.families.llama import ATTENTION, DECODER_TOP, LLAMA_LIKE, decoder_config, decoder_fields

MOE = True  # a mixture-of-experts family: chosen for configs with experts (and only those)
ARCHITECTURES = {"MixtralForCausalLM": "mixtral"}
CONFIG_CLASSES = ("MixtralConfig",)
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    sliding_window num_local_experts num_experts_per_tok router_aux_loss_coef router_jitter_noise
    """.split()
)
NEUTRAL = frozenset({"output_router_logits"})  # whether forward returns the router logits (and adds the loss)

EXPERTS = [
    ("block_sparse_moe.gate.weight", ("moe", "router"), "linear"),
    ("block_sparse_moe.experts.{e}.w1.weight", ("moe", "w_gate"), "linear"),
    ("block_sparse_moe.experts.{e}.w3.weight", ("moe", "w_up"), "linear"),
    ("block_sparse_moe.experts.{e}.w2.weight", ("moe", "w_out"), "linear"),
]
LAYER = ATTENTION + [("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector")] + EXPERTS
# transformers keeps each layer's experts fused in `mlp.experts` (gate_up_proj, down_proj): how peft adapts them
PEFT_EXPERTS = "concatenated"  # gate_up_proj (E, 2F, D): the gate's F rows, then the up's
MOE_DEFAULTS = dict(shared_experts=0, shared_expert_gate=False, router="softmax", router_scale=1.0, router_bias=False)
MOE_DEFAULTS.update(mlp="gated", qkv_bias=False, out_bias=False, first_dense_layers=0)


def layout(cfg: ModelConfig, arch: str):
    return DECODER_TOP, [("model.layers.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    fields = decoder_fields(r)
    r.expect("router_jitter_noise", (0, 0.0), 0.0)  # multiplicative noise on the router's input in training
    return ModelConfig(
        **fields,
        sliding_window=r.get("sliding_window", None) or 0,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        num_experts=r.get("num_local_experts"),
        experts_per_token=r.get("num_experts_per_tok"),
        expert_mlp_dim=fields["mlp_dim"],
        aux_loss_weight=float(r.get("router_aux_loss_coef", 0.0)),
        **rope_params(r),
    )


def architecture(cfg: ModelConfig):
    if not cfg.num_experts or cfg.qk_norm or cfg.position != "rope" or not cfg.causal or cfg.decoder_layers:
        return None
    want = {**LLAMA_LIKE, **MOE_DEFAULTS, "router_normalize": True, "mlp_bias": False}
    problems = mismatches(cfg, want, "Mixtral")
    return "MixtralForCausalLM", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    out = {**decoder_config(cfg), "hidden_act": HF_ACTIVATION[cfg.activation], "rope_parameters": rope_to_hf(cfg)}
    out["intermediate_size"] = cfg.expert_hidden  # the experts' width (the model has no dense MLP)
    out.update(sliding_window=cfg.sliding_window or None, num_local_experts=cfg.num_experts)
    out.update(num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.aux_loss_weight)
    return {**out, "router_jitter_noise": 0.0}
