"""GPT-2: learned positions, pre-norm LayerNorm, GELU MLP with biases, tied read-out; `Conv1D` tensors stored
(in, out) with q, k, v fused in `c_attn`."""

from __future__ import annotations

import logging

from jaxlm.config import ModelConfig
from jaxlm.hf.common import HF_ACTIVATION, PLAIN_BLOCK, mismatches

log = logging.getLogger(__name__)

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
CONFIG_CLASSES = ("GPT2Config",)
KEYS = frozenset(
    """
    vocab_size n_embd n_layer n_head n_inner n_positions layer_norm_epsilon activation_function initializer_range
    tie_word_embeddings attn_pdrop embd_pdrop resid_pdrop scale_attn_weights scale_attn_by_inverse_layer_idx
    add_cross_attention reorder_and_upcast_attn
    """.split()
)
# GPT2DoubleHeadsModel's classification head, not part of the LM; n_ctx: GPT-2's old name for the context
# length, which transformers no longer reads (n_positions sizes the table).
NEUTRAL = frozenset(
    {"summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj"}
    | {"n_ctx"}
)
UNWRITTEN_DROPOUT = ("mlp_dropout",)

TOP = [
    ("transformer.wte.weight", ("embed", "embedding"), "vector"),
    ("transformer.wpe.weight", ("stack", "positions", "embedding"), "vector"),
    ("transformer.ln_f.weight", ("stack", "final_norm", "scale"), "vector"),
    ("transformer.ln_f.bias", ("stack", "final_norm", "bias"), "vector"),
]
LAYER = [
    ("ln_1.weight", ("attn_norm", "scale"), "vector"),
    ("ln_1.bias", ("attn_norm", "bias"), "vector"),
    ("ln_2.weight", ("mlp_norm", "scale"), "vector"),
    ("ln_2.bias", ("mlp_norm", "bias"), "vector"),
    ("attn.c_attn.weight", [("attn", "wq"), ("attn", "wk"), ("attn", "wv")], "conv_qkv"),
    ("attn.c_attn.bias", [("attn", "bq"), ("attn", "bk"), ("attn", "bv")], "conv_qkv_bias"),
    ("attn.c_proj.weight", ("attn", "wo"), "conv_from_heads"),
    ("attn.c_proj.bias", ("attn", "bo"), "vector"),
    ("mlp.c_fc.weight", ("mlp", "w_in"), "vector"),
    ("mlp.c_fc.bias", ("mlp", "b_in"), "vector"),
    ("mlp.c_proj.weight", ("mlp", "w_out"), "vector"),
    ("mlp.c_proj.bias", ("mlp", "b_out"), "vector"),
]


def layout(cfg: ModelConfig, arch: str):
    return TOP, [("transformer.h.{}.", ("stack", "layers"), LAYER, cfg.num_layers)]


def config_from_hf(r, arch: str, tensor_names) -> ModelConfig:
    d = r.get("n_embd")
    r.expect("scale_attn_weights", (True,), True)
    r.expect("scale_attn_by_inverse_layer_idx", (False,), False)
    r.expect("add_cross_attention", (False,), False)
    r.get("reorder_and_upcast_attn", False)  # float32 attention scores: jaxlm always upcasts them
    resid, embd = float(r.get("resid_pdrop", 0.1)), float(r.get("embd_pdrop", 0.1))
    if embd != resid:
        log.warning("%s: embd_pdrop %s differs from resid_pdrop %s; jaxlm uses %s for both", arch, embd, resid, resid)
    return ModelConfig(
        vocab_size=r.get("vocab_size"),
        d_model=d,
        num_layers=r.get("n_layer"),
        num_heads=r.get("n_head"),
        mlp_dim=r.get("n_inner", None) or 4 * d,
        max_seq_len=r.get("n_positions"),
        position="learned",
        norm="layernorm",
        norm_eps=r.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation=r.activation("activation_function", "gelu_new"),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        norm_bias=True,
        tie_embeddings=r.expect("tie_word_embeddings", (True,), True),
        dropout=resid,
        attention_dropout=float(r.get("attn_pdrop", 0.1)),
        init_std=r.get("initializer_range", 0.02),
    )


GPT2_LIKE = dict(norm="layernorm", mlp="plain", qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True)
GPT2_LIKE.update(tie_embeddings=True, norm_position="pre", num_kv_heads=0, sliding_window=0, embed_scale=False)
GPT2_LIKE.update(post_norms=False, qk_norm=False, attn_logit_softcap=0.0, final_logit_softcap=0.0, head="lm")
GPT2_LIKE.update(scale_readout=False, embed_norm=False, attention_scale=0.0, type_vocab_size=0, pooler=False)
GPT2_LIKE.update(PLAIN_BLOCK)


def architecture(cfg: ModelConfig):
    if cfg.position != "learned" or not cfg.causal or cfg.decoder_layers:
        return None
    problems = mismatches(cfg, GPT2_LIKE, "GPT-2")
    if cfg.num_kv_heads not in (0, cfg.num_heads):
        problems.append("grouped-query attention")
    return "GPT2LMHeadModel", problems


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
    act = {**HF_ACTIVATION, "gelu_tanh": "gelu_new"}[cfg.activation]
    return {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim,
        "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": act,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": True,
        "attn_pdrop": cfg.attention_dropout,
        "embd_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
    }
