"""Every ModelConfig field acts in every model class (decoder, encoder, encoder-decoder), or is refused."""

import dataclasses
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.nn.models import build_model

BASE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, max_seq_len=32)
CLASSES = {
    "decoder": dict(BASE),
    "encoder": dict(BASE, causal=False),
    "encoder-decoder": dict(BASE, decoder_layers=2),
}
LOCAL = dict(sliding_window=3, global_every=2)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4096)  # a fractional correction range
MOE = dict(num_experts=4)
MLA = dict(kv_lora_rank=8, qk_rope_head_dim=4, num_kv_heads=0)  # latent attention: K/V heads = heads
SHARED = dict(MOE, shared_experts=1)
MOE_VARIANTS = {
    "num_experts": (MOE, {}),
    "experts_per_token": (dict(MOE, experts_per_token=1), MOE),
    "expert_mlp_dim": (dict(MOE, expert_mlp_dim=16), MOE),
    "shared_experts": (SHARED, MOE),
    "shared_expert_gate": (dict(SHARED, shared_expert_gate=True), SHARED),
    "router=sigmoid": (dict(MOE, router="sigmoid"), MOE),
    "router_normalize": (dict(MOE, router_normalize=False), MOE),
    "router_scale": (dict(MOE, router_scale=2.5), MOE),
    "capacity_factor": (dict(MOE, capacity_factor=0.5), MOE),
    "mlp=plain experts": (dict(MOE, mlp="plain", activation="gelu"), dict(MOE, activation="gelu")),
    "router_bias": (dict(MOE, router_bias=True), MOE),
    "mlp_bias experts": (dict(MOE, mlp_bias=True), MOE),
    "mlp_clamp experts": (dict(MOE, mlp_clamp=0.3), MOE),
    "router_balance": (dict(MOE, router="sigmoid", router_balance=True), dict(MOE, router="sigmoid")),
    "router_groups": (dict(MOE, router_groups=2, router_group_limit=1), MOE),
    "first_dense_layers": (dict(MOE, first_dense_layers=1), MOE),
    "kv_lora_rank": (MLA, {}),
    "q_lora_rank": (dict(MLA, q_lora_rank=12), MLA),
    "qk_nope_head_dim": (dict(MLA, qk_nope_head_dim=4), MLA),
    "v_head_dim": (dict(MLA, v_head_dim=6), MLA),
    "qk_rope_head_dim": (dict(MLA, qk_rope_head_dim=2), MLA),
}
# (field changes, baseline changes): each pair must compute different functions.
VARIANTS = {
    **{f"position={p}": (dict(position=p), {}) for p in ("learned", "sinusoidal", "alibi", "relative", "none")},
    "norm=layernorm": (dict(norm="layernorm"), {}),
    "norm_position=post": (dict(norm_position="post"), {}),
    "norm_offset": (dict(norm_offset=1.0), {}),
    "post_norms": (dict(post_norms=True), {}),
    "qk_norm": (dict(qk_norm=True), {}),
    "embed_norm": (dict(embed_norm=True), {}),
    "embed_scale": (dict(embed_scale=True), {}),
    "scale_readout": (dict(scale_readout=True), {}),
    "sliding_window": (dict(sliding_window=3), {}),
    "global_every": (LOCAL, dict(sliding_window=3)),
    "rope_local_theta": (dict(LOCAL, rope_local_theta=100.0), LOCAL),
    "rope_scaling": (dict(rope_scaling="linear", rope_factor=4.0), {}),
    "attn_logit_softcap": (dict(attn_logit_softcap=0.5), {}),
    "final_logit_softcap": (dict(final_logit_softcap=0.5), {}),
    "attention_scale": (dict(attention_scale=1.0), {}),
    "tie_embeddings": (dict(tie_embeddings=True), {}),
    "mlp=plain": (dict(mlp="plain", activation="gelu"), dict(activation="gelu")),
    "activation": (dict(activation="relu"), {}),
    "qkv_bias": (dict(qkv_bias=True), {}),
    "out_bias": (dict(out_bias=True), {}),
    "num_kv_heads": (dict(num_kv_heads=1), {}),
    "attention_sinks": (dict(attention_sinks=True), {}),
    "mlp_clamp": (dict(mlp_clamp=0.3), {}),
    "mlp_up_shift": (dict(mlp_up_shift=1.0), {}),
    "activation=quick_gelu": (dict(activation="quick_gelu"), {}),
    "rope_truncate": (dict(YARN, rope_truncate=False), YARN),
    **MOE_VARIANTS,
}


def randomized(cfg: ModelConfig):
    """The model with every parameter drawn from a key of its path: models that share a parameter share its
    value, so two configs differ only where their fields act."""
    model = build_model(cfg, rngs=nnx.Rngs(0))
    for path, p in nnx.iter_graph(model):
        if isinstance(p, nnx.Param):
            key = jax.random.PRNGKey(zlib.crc32("/".join(map(str, path)).encode()))
            p.set_value(0.5 * jax.random.normal(key, p[...].shape, p[...].dtype))
    return model


def outputs(cfg: ModelConfig) -> np.ndarray:
    model = randomized(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 61)
    if cfg.decoder_layers:
        return np.asarray(model(tokens, tokens[:, :7]))
    return np.asarray(model(tokens)[0])


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_field_changes_the_output(kind, variant):
    change, baseline = VARIANTS[variant]
    base = ModelConfig(**{**CLASSES[kind], **baseline})
    try:
        changed = ModelConfig(**{**CLASSES[kind], **change})
    except ConfigError as e:  # refused, naming the field
        pytest.fail(f"{variant} refused in a {kind}: {e}")
    assert not np.allclose(outputs(changed), outputs(base), atol=1e-5), f"{variant} does nothing in a {kind}"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(post_norms=True, norm_position="post"), "post_norms"),
        (dict(norm_offset=1.0, norm="layernorm"), "norm_offset"),
        (dict(global_every=2), "global_every"),
        (dict(rope_local_theta=10.0), "rope_local_theta"),
        (dict(attn_logit_softcap=5.0, attention_impl="xla"), "attn_logit_softcap"),
        (dict(rope_scaling="longrope", rope_factor=2.0, rope_original_max_len=8), "rope_short_factor"),
        (dict(decoder_layers=2, pooler=True), "encoder-decoder"),
        (dict(num_experts=4, experts_per_token=5), "experts_per_token"),
        (dict(num_experts=4, experts_per_token=0), "experts_per_token"),
        (dict(shared_experts=1), "shared_experts configures a mixture of experts"),
        (dict(aux_loss_weight=0.01), "aux_loss_weight configures a mixture of experts"),
        (dict(num_experts=4, shared_expert_gate=True), "shared_expert_gate"),
        (dict(router_bias=True), "router_bias configures a mixture of experts"),
        (dict(mlp_clamp=1.0, mlp="plain"), "mlp_clamp"),
        (dict(attention_sinks=True, attention_impl="xla"), "attention_sinks"),
        (dict(rope_truncate=False), "rope_truncate"),
        (dict(kv_lora_rank=8, num_kv_heads=0), "qk_rope_head_dim"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=4, num_kv_heads=0, position="learned"), "position=rope"),
        (dict(kv_lora_rank=64, qk_rope_head_dim=4), r"kv_lora_rank \(64\) exceeds model.d_model"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=4, num_kv_heads=2), "num_kv_heads"),
        (dict(q_lora_rank=8), "kv_lora_rank > 0"),
        (dict(num_experts=4, router_groups=3, router_group_limit=1), "router_groups"),
        (dict(num_experts=4, router_groups=2, router_group_limit=3), "router_group_limit"),
        (dict(num_experts=4, router_balance_rate=0.01), "router_balance"),
        (dict(num_experts=4, first_dense_layers=2), "first_dense_layers"),
        (dict(num_experts=4, mlp_dropout=0.1), "mlp_dropout"),
        (dict(num_experts=4, router="top1"), "router"),
    ],
)
def test_fields_that_cannot_act_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **fields})


def test_bfloat16_compute_tracks_float32():
    """bf16 compute (float32 parameters) against fp32: logits close and the same top token almost everywhere."""
    cfg = ModelConfig(**BASE)
    fp32 = randomized(cfg)
    bf16 = randomized(dataclasses.replace(cfg, dtype="bfloat16"))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 24), 0, 61)
    a, b = np.asarray(fp32(tokens)[0]), np.asarray(bf16(tokens)[0])
    assert b.dtype == np.float32
    scale = np.abs(a).max()
    assert np.abs(a - b).max() < 0.05 * scale, (np.abs(a - b).max(), scale)
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.9
    assert not np.array_equal(a, b)  # the bf16 path really ran in bf16
