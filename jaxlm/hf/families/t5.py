"""T5 (v1.0 and v1.1): an encoder-decoder with a relative position bias per stack, pre-norm RMSNorm without
biases, unscaled attention, and a ReLU (v1.0) or gated-GELU (v1.1) MLP; v1.0 scales the tied read-out."""

from __future__ import annotations

import logging

from jaxlm.config import ModelConfig
from jaxlm.hf.common import ACTIVATIONS, PLAIN_BLOCK, mismatches

log = logging.getLogger(__name__)

ARCHITECTURES = {"T5ForConditionalGeneration": "t5", "T5WithLMHeadModel": "t5"}  # the second: transformers 2.x
CONFIG_CLASSES = ("T5Config",)
KEYS = frozenset(
    """
    vocab_size d_model num_layers num_decoder_layers num_heads d_kv d_ff n_positions layer_norm_epsilon
    relative_attention_num_buckets relative_attention_max_distance feed_forward_proj dense_act_fn is_gated_act
    is_encoder_decoder is_decoder decoder_start_token_id initializer_factor tie_word_embeddings
    scale_decoder_outputs dropout_rate
    """.split()
)
NEUTRAL = frozenset({"classifier_dropout"})  # T5ForSequenceClassification's head, not built


def _layer(decoder: bool, gated: bool):
    attn = [
        ("layer.0.SelfAttention.q.weight", ("attn", "wq"), "linear_to_heads"),
        ("layer.0.SelfAttention.k.weight", ("attn", "wk"), "linear_to_heads"),
        ("layer.0.SelfAttention.v.weight", ("attn", "wv"), "linear_to_heads"),
        ("layer.0.SelfAttention.o.weight", ("attn", "wo"), "linear_from_heads"),
        ("layer.0.layer_norm.weight", ("attn_norm", "scale"), "vector"),
    ]
    m = "layer.2" if decoder else "layer.1"
    cross = [
        ("layer.1.EncDecAttention.q.weight", ("cross", "wq"), "linear_to_heads"),
        ("layer.1.EncDecAttention.k.weight", ("cross", "wk"), "linear_to_heads"),
        ("layer.1.EncDecAttention.v.weight", ("cross", "wv"), "linear_to_heads"),
        ("layer.1.EncDecAttention.o.weight", ("cross", "wo"), "linear_from_heads"),
        ("layer.1.layer_norm.weight", ("cross_norm", "scale"), "vector"),
    ]
    if gated:
        mlp = [(f"{m}.DenseReluDense.wi_0.weight", ("mlp", "w_gate"), "linear")]
        mlp += [(f"{m}.DenseReluDense.wi_1.weight", ("mlp", "w_up"), "linear")]
    else:
        mlp = [(f"{m}.DenseReluDense.wi.weight", ("mlp", "w_in"), "linear")]
    mlp += [
        (f"{m}.DenseReluDense.wo.weight", ("mlp", "w_out"), "linear"),
        (f"{m}.layer_norm.weight", ("mlp_norm", "scale"), "vector"),
    ]
    return attn + (cross if decoder else []) + mlp


def layout(cfg: ModelConfig, arch: str):
    gated = cfg.mlp == "gated"
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    top = [
        ("shared.weight", ("embed", "embedding"), "vector"),
        (f"encoder.{bias}", ("encoder", "relative_bias"), "vector"),
        (f"decoder.{bias}", ("decoder", "relative_bias"), "vector"),
        ("encoder.final_layer_norm.weight", ("encoder", "final_norm", "scale"), "vector"),
        ("decoder.final_layer_norm.weight", ("decoder", "final_norm", "scale"), "vector"),
        ("lm_head.weight", ("lm_head",), "linear"),
    ]
    stacks = [
        ("encoder.block.{}.", ("encoder", "layers"), _layer(False, gated), cfg.num_layers),
        ("decoder.block.{}.", ("decoder", "layers"), _layer(True, gated), cfg.decoder_layers),
    ]
    return top, stacks


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    ff = r.expect("feed_forward_proj", ("relu", "gated-gelu", "gated-relu", "gelu"), "relu")
    gated, act = ff.startswith("gated"), ff.split("-")[-1]
    dense_act = r.get("dense_act_fn", None)
    act = "gelu_new" if ff == "gated-gelu" else dense_act or act  # transformers maps gated-gelu to gelu_new
    r.get("is_gated_act", None)
    r.expect("is_encoder_decoder", (True,), True)
    r.expect("is_decoder", (False,), False)
    start = r.get("decoder_start_token_id", None)
    start = r.hf.get("pad_token_id", 0) if start is None else start
    r.get("initializer_factor", None)
    tied_flag = r.get("tie_word_embeddings", True)
    # transformers >= 5 writes scale_decoder_outputs; older configs say tie_word_embeddings=false for v1.1.
    scale = r.get("scale_decoder_outputs", tied_flag is not False)
    rate = float(r.get("dropout_rate", 0.1))
    if rate:
        log.info("%s: dropout_rate %s on embeddings, branches, MLP hidden states, attention weights", arch, rate)
    return ModelConfig(
        vocab_size=r.get("vocab_size"),
        d_model=r.get("d_model"),
        num_layers=r.get("num_layers"),
        decoder_layers=r.get("num_decoder_layers", None) or r.hf["num_layers"],
        num_heads=r.get("num_heads"),
        head_dim=r.get("d_kv"),
        mlp_dim=r.get("d_ff"),
        max_seq_len=r.get("n_positions", 512),
        position="relative",
        relative_buckets=r.get("relative_attention_num_buckets", 32),
        relative_max_distance=r.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        norm_eps=r.get("layer_norm_epsilon", 1e-6),
        mlp="gated" if gated else "plain",
        activation=ACTIVATIONS[act],
        attention_scale=1.0,
        tie_embeddings="lm_head.weight" not in set(tensor_names),
        scale_readout=bool(scale),
        decoder_start_id=int(start or 0),
        dropout=rate,
        attention_dropout=rate,  # T5 drops attention weights and MLP hidden states at the same rate
        mlp_dropout=rate,
        init_std=1.0,
    )


T5_LIKE = dict(position="relative", norm="rmsnorm", norm_position="pre", qkv_bias=False, out_bias=False)
T5_LIKE.update(mlp_bias=False, attention_scale=1.0, embed_scale=False, sliding_window=0, post_norms=False)
T5_LIKE.update(qk_norm=False, norm_offset=0.0, attn_logit_softcap=0.0, final_logit_softcap=0.0, embed_norm=False)
T5_LIKE.update(PLAIN_BLOCK)


def architecture(cfg: ModelConfig):
    if not cfg.decoder_layers:
        return None
    problems = mismatches(cfg, T5_LIKE, "T5")
    if cfg.kv_heads != cfg.num_heads:
        problems.append("grouped-query attention")
    return "T5ForConditionalGeneration", problems


def config_to_hf(cfg: ModelConfig, arch: str, eos_id: int | None = None) -> dict:
    if not cfg.attention_dropout == cfg.mlp_dropout == cfg.dropout:
        log.warning(
            "%s has one dropout_rate: writing model.dropout %s, not attention_dropout %s or mlp_dropout %s",
            arch,
            cfg.dropout,
            cfg.attention_dropout,
            cfg.mlp_dropout,
        )
    act = {"relu": "relu", "gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
    if eos_id is None:
        start = max(cfg.decoder_start_id, 0)
    else:
        start = eos_id if cfg.decoder_start_id < 0 else cfg.decoder_start_id
    return {
        "pad_token_id": 0,
        "decoder_start_token_id": start,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.dim_per_head,
        "d_ff": cfg.mlp_dim,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": ("gated-" if cfg.mlp == "gated" else "") + ("gelu" if act == "gelu_new" else act),
        "dense_act_fn": act,
        "is_encoder_decoder": True,
        "dropout_rate": cfg.dropout,
        "tie_word_embeddings": cfg.scale_readout,  # read by transformers < 5 as "scale the read-out"
        "scale_decoder_outputs": cfg.scale_readout,
    }
