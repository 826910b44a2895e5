"""DeepSeek-V3 (and V2's layout): multi-head latent attention, and a mixture of experts after the first dense
layers (first_k_dense_replace) with a shared expert, sigmoid scores, a selection-only balancing bias
(e_score_correction_bias), group-limited routing (n_group, topk_group) and routed_scaling_factor.

DeepSeek stores the RoPE features of q_b_proj / q_proj and kv_a_proj_with_mqa as interleaved pairs
(rope_interleave: true); they are reordered to jaxlm's halves at load and back at save (`mla_rope_order`)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (
    HF_ACTIVATION,
    ROPE_KEYS,
    max_positions,
    mismatches,
    rope_params,
    rope_to_hf,
    yarn_mscale,
    yarn_softmax_scale,
)
from jaxlm.hf.families.llama import DECODER_TOP, LLAMA_LIKE, MLP

MOE = True
ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3"}
CONFIG_CLASSES = ("DeepseekV3Config",)
KEYS = ROPE_KEYS | set(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim intermediate_size
    max_position_embeddings rms_norm_eps hidden_act tie_word_embeddings attention_dropout initializer_range
    attention_bias pretraining_tp rope_interleave kv_lora_rank q_lora_rank qk_rope_head_dim qk_nope_head_dim
    v_head_dim qk_head_dim n_routed_experts n_shared_experts num_experts_per_tok moe_intermediate_size
    routed_scaling_factor n_group topk_group norm_topk_prob first_k_dense_replace
    """.split()
)
# transformers keeps each layer's experts fused in `mlp.experts` (gate_up_proj, down_proj): how peft adapts them
PEFT_EXPERTS = "concatenated"  # gate_up_proj (E, 2F, D): the gate's F rows, then the up's
# The multi-token-prediction layers: their weights are not part of the causal LM transformers builds.
NEUTRAL = frozenset({"output_router_logits", "num_nextn_predict_layers", "num_mtp_layers"})


def _attention(cfg: ModelConfig) -> list:
    q = (
        [
            ("self_attn.q_a_proj.weight", ("attn", "wq_a"), "linear"),
            ("self_attn.q_a_layernorm.weight", ("attn", "q_norm", "scale"), "vector"),
            ("self_attn.q_b_proj.weight", ("attn", "wq_b"), "mla_q"),
        ]
        if cfg.q_lora_rank
        else [("self_attn.q_proj.weight", ("attn", "wq"), "mla_q")]
    )
    return q + [
        ("input_layernorm.weight", ("attn_norm", "scale"), "vector"),
        ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), "mla_kv_a"),
        ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), "vector"),
        ("self_attn.kv_b_proj.weight", ("attn", "wkv_b"), "mla_kv_b"),
        ("self_attn.o_proj.weight", ("attn", "wo"), "mla_o"),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ]


EXPERTS = [
    ("mlp.gate.weight", ("moe", "router"), "linear"),
    ("mlp.gate.e_score_correction_bias", ("moe", "router_balance"), "vector"),
    ("mlp.experts.{e}.gate_proj.weight", ("moe", "w_gate"), "linear"),
    ("mlp.experts.{e}.up_proj.weight", ("moe", "w_up"), "linear"),
    ("mlp.experts.{e}.down_proj.weight", ("moe", "w_out"), "linear"),
    ("mlp.shared_experts.gate_proj.weight", ("moe", "shared", "w_gate"), "linear"),
    ("mlp.shared_experts.up_proj.weight", ("moe", "shared", "w_up"), "linear"),
    ("mlp.shared_experts.down_proj.weight", ("moe", "shared", "w_out"), "linear"),
]
DEEPSEEK = dict(router="sigmoid", router_balance=True, router_bias=False, mlp="gated")
DEEPSEEK.update(shared_expert_gate=False, qkv_bias=False, out_bias=False)


def layout(cfg: ModelConfig, arch: str):
    attention, first = _attention(cfg), cfg.first_dense_layers
    stacks = [("model.layers.{}.", ("stack", "layers"), attention + EXPERTS, cfg.num_layers - first, first)]
    if first:
        stacks.insert(0, ("model.layers.{}.", ("stack", "dense_layers"), attention + MLP, first, 0))
    return DECODER_TOP, stacks


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    n = r.get("num_attention_heads")
    if r.get("num_key_value_heads", n) != n:
        raise ConfigError(f"{arch}: num_key_value_heads must equal num_attention_heads ({n}) for latent attention")
    r.expect("attention_bias", (False,), False)
    r.expect("pretraining_tp", (1,), 1)
    r.expect("rope_interleave", (True,), True)
    r.get("head_dim", None)  # transformers' RoPE width: qk_rope_head_dim
    nope, rope = r.get("qk_nope_head_dim"), r.get("qk_rope_head_dim")
    if r.get("qk_head_dim", nope + rope) != nope + rope:
        raise ConfigError(f"{arch}: qk_head_dim must be qk_nope_head_dim + qk_rope_head_dim")
    groups = r.get("n_group", None) or 1
    limit = r.get("topk_group", None) or groups
    fields = dict(
        vocab_size=r.get("vocab_size"),
        d_model=r.get("hidden_size"),
        num_layers=r.get("num_hidden_layers"),
        num_heads=n,
        head_dim=nope,
        mlp_dim=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        position="rope",
        norm="rmsnorm",
        norm_eps=r.get("rms_norm_eps", 1e-6),
        activation=r.activation("hidden_act", "silu"),
        norm_bias=False,
        attention_dropout=float(r.get("attention_dropout", 0.0)),
        init_std=r.get("initializer_range", 0.02),
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        kv_lora_rank=r.get("kv_lora_rank"),
        q_lora_rank=r.get("q_lora_rank", None) or 0,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=nope,
        v_head_dim=r.get("v_head_dim"),
        num_experts=r.get("n_routed_experts"),
        experts_per_token=r.get("num_experts_per_tok"),
        expert_mlp_dim=r.get("moe_intermediate_size"),
        shared_experts=r.get("n_shared_experts", None) or 0,
        router_normalize=bool(r.get("norm_topk_prob", True)),
        router_scale=float(r.get("routed_scaling_factor", 1.0)),
        router_groups=groups if groups > 1 else 0,
        router_group_limit=limit if groups > 1 else 0,
        first_dense_layers=r.get("first_k_dense_replace", 0) or 0,
        **{k: v for k, v in DEEPSEEK.items() if k != "router_bias"},
    )
    folded = yarn_softmax_scale(r)  # YaRN's mscale_all_dim, on every dim of q.k (not only the rotated ones)
    if folded != 1.0:
        fields["attention_scale"] = (nope + rope) ** -0.5 * folded
    return ModelConfig(**fields, **rope_params(r))


def _mscale_all_dim(cfg: ModelConfig) -> float | None:
    """The `mscale_all_dim` whose fold gives cfg.attention_scale (None: the plain 1/sqrt(qk_head_dim))."""
    if not cfg.attention_scale:
        return None
    m = (cfg.attention_scale * (cfg.mla_nope_dim + cfg.qk_rope_head_dim) ** 0.5) ** 0.5
    return (m - 1.0) / (yarn_mscale(cfg.rope_factor) - 1.0)


def architecture(cfg: ModelConfig):
    if not cfg.num_experts or not cfg.kv_lora_rank or not cfg.causal or cfg.decoder_layers:
        return None
    want = {**LLAMA_LIKE, **DEEPSEEK}
    for key in ("kv_lora_rank", "first_dense_layers", "router_groups", "router_group_limit"):
        del want[key]  # DeepSeek's own
    del want["attention_scale"]  # YaRN's mscale_all_dim (below)
    problems = mismatches(cfg, want, "DeepSeek-V3")
    if cfg.attention_scale and (cfg.rope_scaling != "yarn" or cfg.rope_factor <= 1):
        problems.append("attention_scale other than 1/sqrt(qk_head_dim) without YaRN (its mscale_all_dim)")
    if cfg.router_group_limit and not cfg.router_groups:
        problems.append("group limit without groups")
    return "DeepseekV3ForCausalLM", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.qk_rope_head_dim,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": max_positions(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": HF_ACTIVATION[cfg.activation],
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": cfg.attention_dropout,
        "attention_bias": False,
        "rope_interleave": True,
        "rope_parameters": _rope(cfg),
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.mla_nope_dim,
        "qk_head_dim": cfg.mla_nope_dim + cfg.qk_rope_head_dim,
        "v_head_dim": cfg.mla_v_dim,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": cfg.shared_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.expert_hidden,
        "routed_scaling_factor": cfg.router_scale,
        "n_group": cfg.router_groups or 1,
        "topk_group": cfg.router_group_limit or 1,
        "norm_topk_prob": cfg.router_normalize,
        "first_k_dense_replace": cfg.first_dense_layers,
        "num_nextn_predict_layers": 0,
    }


def _rope(cfg: ModelConfig) -> dict:
    rope = rope_to_hf(cfg)
    all_dim = _mscale_all_dim(cfg)
    if all_dim is not None:  # with attention_factor written out, mscale only matters through mscale_all_dim
        rope.update(
            mscale=1.0,
            mscale_all_dim=all_dim,
            attention_factor=cfg.rope_attention_factor or yarn_mscale(cfg.rope_factor),
        )
    return rope
