"""Model presets: published architectures as `ModelConfig` field values (data, not subclasses).

This module is data alone (no jaxlm imports): `jaxlm.config` builds `PRESETS` (ModelConfig values) from it
and reads the `preset` key with `get_preset`.

Use one in YAML with `model: {preset: llama2_7b}`; further keys override it.
The tiny trainable configs live in `configs/*.yaml`.
"""

from __future__ import annotations

_GPT2 = dict(
    position="learned",
    norm="layernorm",
    mlp="plain",
    activation="gelu_tanh",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
)
_LLAMA = dict(position="rope", norm="rmsnorm", mlp="gated", activation="silu")
_GEMMA = dict(_LLAMA, activation="gelu_tanh", norm_eps=1e-6, norm_offset=1.0, post_norms=True, embed_scale=True)
_GEMMA.update(tie_embeddings=True)

PRESET_FIELDS: dict[str, dict] = {
    # Radford et al. 2019; 124,439,808 parameters.
    "gpt2_124m": dict(
        vocab_size=50257,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        max_seq_len=1024,
        norm_eps=1e-5,
        **_GPT2,
    ),
    # Touvron et al. 2023; 6,738,415,616 parameters.
    "llama2_7b": dict(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        mlp_dim=11008,
        max_seq_len=4096,
        norm_eps=1e-5,
        **_LLAMA,
    ),
    # Meta 2024; 8,030,261,248 parameters.
    "llama3_8b": dict(
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        norm_eps=1e-5,
        **_LLAMA,
    ),
    # Gemma Team 2024 (google/gemma-2-2b); 2,614,341,888 parameters.
    "gemma2_2b": dict(
        vocab_size=256000,
        d_model=2304,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        mlp_dim=9216,
        max_seq_len=8192,
        sliding_window=4096,
        global_every=2,
        attention_scale=256**-0.5,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        **_GEMMA,
    ),
    # Qwen Team 2025 (Qwen/Qwen3-0.6B); 596,049,920 parameters (tied embeddings).
    "qwen3_0_6b": dict(
        vocab_size=151936,
        d_model=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=3072,
        max_seq_len=40960,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        qk_norm=True,
        tie_embeddings=True,
        **_LLAMA,
    ),
    # Abdin et al. 2024 (microsoft/Phi-3-mini-4k-instruct); 3,821,079,552 parameters.
    "phi3_mini": dict(
        vocab_size=32064,
        d_model=3072,
        num_layers=32,
        num_heads=32,
        mlp_dim=8192,
        max_seq_len=4096,
        sliding_window=2047,
        norm_eps=1e-5,
        **_LLAMA,
    ),
    # Jiang et al. 2024 (mistralai/Mixtral-8x7B-v0.1); 46,702,792,704 parameters, 12,879,925,248 active a token.
    "mixtral_8x7b": dict(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_seq_len=32768,
        rope_theta=1_000_000.0,
        norm_eps=1e-5,
        num_experts=8,
        experts_per_token=2,
        aux_loss_weight=0.02,
        **_LLAMA,
    ),
    # OpenAI 2025 (openai/gpt-oss-20b); 20,914,757,184 parameters, 4,187,440,704 active a token (3,608,307,264
    # without the embedding table: OpenAI's "3.6B active").
    "gpt_oss_20b": dict(
        vocab_size=201088,
        d_model=2880,
        num_layers=24,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=2880,
        max_seq_len=131072,
        rope_theta=150000.0,
        rope_scaling="yarn",
        rope_factor=32.0,
        rope_original_max_len=4096,
        rope_truncate=False,
        sliding_window=128,
        global_every=2,
        norm_eps=1e-5,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        attention_sinks=True,
        num_experts=32,
        experts_per_token=4,
        router_bias=True,
        mlp_clamp=7.0,
        mlp_up_shift=1.0,
        aux_loss_weight=0.9,
        **dict(_LLAMA, activation="quick_gelu"),
    ),
    # DeepSeek-AI 2024 (deepseek-ai/DeepSeek-V3, without its multi-token-prediction layer); 671,026,419,200
    # parameters (as published), 37,552,297,472 active a token ("37B"). Latent attention, 3 dense layers, then
    # 256 experts (8 a token, in 4 of 8 groups) and a shared one.
    "deepseek_v3": dict(
        vocab_size=129280,
        d_model=7168,
        num_layers=61,
        num_heads=128,
        head_dim=128,
        mlp_dim=18432,
        max_seq_len=163840,
        norm_eps=1e-6,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        num_experts=256,
        experts_per_token=8,
        expert_mlp_dim=2048,
        shared_experts=1,
        first_dense_layers=3,
        router="sigmoid",
        router_balance=True,
        router_balance_rate=0.001,
        router_scale=2.5,
        router_groups=8,
        router_group_limit=4,
        **_LLAMA,
    ),
    # Qwen Team 2025 (Qwen/Qwen3-30B-A3B); 30,532,122,624 parameters, 3,353,032,704 active a token.
    "qwen3_30b_a3b": dict(
        vocab_size=151936,
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        mlp_dim=6144,
        max_seq_len=40960,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        qk_norm=True,
        num_experts=128,
        experts_per_token=8,
        expert_mlp_dim=768,
        aux_loss_weight=0.001,
        **_LLAMA,
    ),
}
