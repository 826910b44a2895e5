"""BERT: a bidirectional encoder with learned positions and token types, post-norm LayerNorm, an embedding
norm; `BertModel` (with the pooler) or `BertForMaskedLM` (the MLM transform and tied read-out)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import PLAIN_BLOCK, mismatches

ARCHITECTURES = {"BertModel": "bert", "BertForMaskedLM": "bert"}
CONFIG_CLASSES = ("BertConfig",)
KEYS = frozenset(
    """
    vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size max_position_embeddings
    type_vocab_size layer_norm_eps hidden_act initializer_range hidden_dropout_prob attention_probs_dropout_prob
    tie_word_embeddings is_decoder add_cross_attention position_embedding_type
    """.split()
)
NEUTRAL = frozenset({"classifier_dropout"})  # BertForSequenceClassification's head, not built
UNWRITTEN_DROPOUT = ("mlp_dropout",)

LAYER = [
    ("attention.self.query.weight", ("attn", "wq"), "linear_to_heads"),
    ("attention.self.key.weight", ("attn", "wk"), "linear_to_heads"),
    ("attention.self.value.weight", ("attn", "wv"), "linear_to_heads"),
    ("attention.self.query.bias", ("attn", "bq"), "bias_heads"),
    ("attention.self.key.bias", ("attn", "bk"), "bias_heads"),
    ("attention.self.value.bias", ("attn", "bv"), "bias_heads"),
    ("attention.output.dense.weight", ("attn", "wo"), "linear_from_heads"),
    ("attention.output.dense.bias", ("attn", "bo"), "vector"),
    ("attention.output.LayerNorm.weight", ("attn_norm", "scale"), "vector"),
    ("attention.output.LayerNorm.bias", ("attn_norm", "bias"), "vector"),
    ("intermediate.dense.weight", ("mlp", "w_in"), "linear"),
    ("intermediate.dense.bias", ("mlp", "b_in"), "vector"),
    ("output.dense.weight", ("mlp", "w_out"), "linear"),
    ("output.dense.bias", ("mlp", "b_out"), "vector"),
    ("output.LayerNorm.weight", ("mlp_norm", "scale"), "vector"),
    ("output.LayerNorm.bias", ("mlp_norm", "bias"), "vector"),
]


def layout(cfg: ModelConfig, arch: str):
    p = "bert." if arch == "BertForMaskedLM" else ""
    top = [
        (p + "embeddings.word_embeddings.weight", ("embed", "embedding"), "vector"),
        (p + "embeddings.position_embeddings.weight", ("stack", "positions", "embedding"), "vector"),
        (p + "embeddings.token_type_embeddings.weight", ("token_types",), "vector"),
        (p + "embeddings.LayerNorm.weight", ("stack", "embed_norm", "scale"), "vector"),
        (p + "embeddings.LayerNorm.bias", ("stack", "embed_norm", "bias"), "vector"),
        ("pooler.dense.weight", ("pool_dense",), "linear"),
        ("pooler.dense.bias", ("pool_bias",), "vector"),
        ("cls.predictions.transform.dense.weight", ("head_dense",), "linear"),
        ("cls.predictions.transform.dense.bias", ("head_dense_bias",), "vector"),
        ("cls.predictions.transform.LayerNorm.weight", ("head_norm", "scale"), "vector"),
        ("cls.predictions.transform.LayerNorm.bias", ("head_norm", "bias"), "vector"),
        ("cls.predictions.bias", ("head_bias",), "vector"),
    ]
    return top, [(p + "encoder.layer.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    r.expect("is_decoder", (False,), False)
    r.expect("add_cross_attention", (False,), False)
    r.expect("position_embedding_type", ("absolute",), "absolute")
    return ModelConfig(
        vocab_size=r.get("vocab_size"),
        d_model=r.get("hidden_size"),
        num_layers=r.get("num_hidden_layers"),
        num_heads=r.get("num_attention_heads"),
        mlp_dim=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        position="learned",
        norm="layernorm",
        norm_eps=r.get("layer_norm_eps", 1e-12),
        norm_position="post",
        mlp="plain",
        activation=r.activation("hidden_act", "gelu", ("gelu", "gelu_new", "relu")),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        norm_bias=True,
        tie_embeddings=r.expect("tie_word_embeddings", (True,), True),
        causal=False,
        type_vocab_size=r.get("type_vocab_size", 2),
        embed_norm=True,
        head="mlm" if arch == "BertForMaskedLM" else "lm",
        pooler=arch == "BertModel",
        dropout=float(r.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(r.get("attention_probs_dropout_prob", 0.1)),
        init_std=r.get("initializer_range", 0.02),
    )


BERT_LIKE = dict(position="learned", norm="layernorm", norm_position="post", mlp="plain", qkv_bias=True)
BERT_LIKE.update(out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True, embed_norm=True, num_kv_heads=0)
BERT_LIKE.update(sliding_window=0, embed_scale=False, qk_norm=False, attn_logit_softcap=0.0, final_logit_softcap=0.0)
BERT_LIKE.update(scale_readout=False, attention_scale=0.0)
BERT_LIKE.update(PLAIN_BLOCK)


def architecture(cfg: ModelConfig):
    if cfg.causal or cfg.decoder_layers:
        return None
    problems = mismatches(cfg, BERT_LIKE, "BERT")
    arch = "BertForMaskedLM" if cfg.head == "mlm" else "BertModel"
    if cfg.head == "mlm" and cfg.pooler:
        problems.append("a pooler with the MLM head (BertForMaskedLM has none)")
    if cfg.head == "lm" and not cfg.pooler:
        problems.append("no pooler (BertModel has one)")
    return arch, problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation],
        "initializer_range": cfg.init_std,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "tie_word_embeddings": True,
    }
