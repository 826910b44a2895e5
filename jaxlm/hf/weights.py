"""Hugging Face tensor names and layouts <-> jaxlm parameters.

torch `nn.Linear` stores (out, in); jaxlm stores (in, out) with heads split
out: q (D, N, H), k/v (D, K, H), o (N, H, D). GPT-2's `Conv1D` already stores
(in, out) and fuses q, k, v into one `c_attn`. Layers are stacked along a
leading `layers` axis in jaxlm and numbered in Hugging Face names. Both RoPE
implementations rotate halves (`rotate_half`), so q/k need no permutation.
"""

from __future__ import annotations

import numpy as np

from jaxlm.config import ConfigError, ModelConfig

# Per-layer tensors of the LLaMA family: (HF suffix, jaxlm path inside a block, layout).
_LLAMA_LAYER = [
    ("input_layernorm.weight", ("attn_norm", "scale"), "vector"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "vector"),
    ("self_attn.q_proj.weight", ("attn", "wq"), "linear_to_heads"),
    ("self_attn.k_proj.weight", ("attn", "wk"), "linear_to_heads"),
    ("self_attn.v_proj.weight", ("attn", "wv"), "linear_to_heads"),
    ("self_attn.o_proj.weight", ("attn", "wo"), "linear_from_heads"),
    ("self_attn.q_proj.bias", ("attn", "bq"), "bias_heads"),
    ("self_attn.k_proj.bias", ("attn", "bk"), "bias_heads"),
    ("self_attn.v_proj.bias", ("attn", "bv"), "bias_heads"),
    ("self_attn.o_proj.bias", ("attn", "bo"), "vector"),
    ("mlp.gate_proj.weight", ("mlp", "w_gate"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "w_up"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "w_out"), "linear"),
]
_GPT2_LAYER = [
    ("ln_1.weight", ("attn_norm", "scale"), "vector"),
    ("ln_1.bias", ("attn_norm", "bias"), "vector"),
    ("ln_2.weight", ("mlp_norm", "scale"), "vector"),
    ("ln_2.bias", ("mlp_norm", "bias"), "vector"),
    ("attn.c_attn.weight", ("attn", ("wq", "wk", "wv")), "conv_qkv"),
    ("attn.c_attn.bias", ("attn", ("bq", "bk", "bv")), "conv_qkv_bias"),
    ("attn.c_proj.weight", ("attn", "wo"), "conv_from_heads"),
    ("attn.c_proj.bias", ("attn", "bo"), "vector"),
    ("mlp.c_fc.weight", ("mlp", "w_in"), "vector"),
    ("mlp.c_fc.bias", ("mlp", "b_in"), "vector"),
    ("mlp.c_proj.weight", ("mlp", "w_out"), "vector"),
    ("mlp.c_proj.bias", ("mlp", "b_out"), "vector"),
]
_BERT_LAYER = [
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


def _t5_layer(decoder: bool, gated: bool):
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


# Buffers some checkpoints carry that hold no parameters.
_BUFFERS = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")


def _layout(arch: str, cfg: ModelConfig):
    """(top-level tensors, layer stacks: (HF name prefix, jaxlm stack name, per-layer table, layers))."""
    if arch == "T5ForConditionalGeneration":
        gated = cfg.mlp == "gated"
        top = [
            ("shared.weight", ("embed", "embedding"), "vector"),
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("encoder_bias",), "vector"),
            ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("decoder_bias",), "vector"),
            ("encoder.final_layer_norm.weight", ("encoder_norm", "scale"), "vector"),
            ("decoder.final_layer_norm.weight", ("decoder_norm", "scale"), "vector"),
            ("lm_head.weight", ("lm_head",), "linear"),
        ]
        stacks = [
            ("encoder.block.{}.", "encoder", _t5_layer(False, gated), cfg.num_layers),
            ("decoder.block.{}.", "decoder", _t5_layer(True, gated), cfg.decoder_layers),
        ]
        return top, stacks
    if arch in ("BertModel", "BertForMaskedLM"):
        p = "bert." if arch == "BertForMaskedLM" else ""
        top = [
            (p + "embeddings.word_embeddings.weight", ("embed", "embedding"), "vector"),
            (p + "embeddings.position_embeddings.weight", ("positions", "embedding"), "vector"),
            (p + "embeddings.token_type_embeddings.weight", ("token_types",), "vector"),
            (p + "embeddings.LayerNorm.weight", ("embed_norm", "scale"), "vector"),
            (p + "embeddings.LayerNorm.bias", ("embed_norm", "bias"), "vector"),
            ("pooler.dense.weight", ("pool_dense",), "linear"),
            ("pooler.dense.bias", ("pool_bias",), "vector"),
            ("cls.predictions.transform.dense.weight", ("head_dense",), "linear"),
            ("cls.predictions.transform.dense.bias", ("head_dense_bias",), "vector"),
            ("cls.predictions.transform.LayerNorm.weight", ("head_norm", "scale"), "vector"),
            ("cls.predictions.transform.LayerNorm.bias", ("head_norm", "bias"), "vector"),
            ("cls.predictions.bias", ("head_bias",), "vector"),
        ]
        return top, [(p + "encoder.layer.{}.", "layers", _BERT_LAYER, cfg.num_layers)]
    if arch == "GPT2LMHeadModel":
        top = [
            ("transformer.wte.weight", ("embed", "embedding"), "vector"),
            ("transformer.wpe.weight", ("positions", "embedding"), "vector"),
            ("transformer.ln_f.weight", ("final_norm", "scale"), "vector"),
            ("transformer.ln_f.bias", ("final_norm", "bias"), "vector"),
        ]
        return top, [("transformer.h.{}.", "layers", _GPT2_LAYER, cfg.num_layers)]
    top = [
        ("model.embed_tokens.weight", ("embed", "embedding"), "vector"),
        ("model.norm.weight", ("final_norm", "scale"), "vector"),
        ("lm_head.weight", ("lm_head",), "linear"),
    ]
    return top, [("model.layers.{}.", "layers", _LLAMA_LAYER, cfg.num_layers)]


def _to_jax(x: np.ndarray, layout: str, cfg: ModelConfig):
    D, H = cfg.d_model, cfg.dim_per_head
    if layout == "vector":
        return x
    if layout == "linear":
        return x.T
    if layout == "linear_to_heads":  # (n H, D) -> (D, n, H)
        return x.T.reshape(D, -1, H)
    if layout == "linear_from_heads":  # (D, N H) -> (N, H, D)
        return x.T.reshape(-1, H, D)
    if layout == "bias_heads":
        return x.reshape(-1, H)
    if layout == "conv_from_heads":  # (N H, D) -> (N, H, D)
        return x.reshape(-1, H, D)
    if layout == "conv_qkv":  # (D, 3 N H) -> 3 x (D, N, H)
        return tuple(p.reshape(D, -1, H) for p in np.split(x, 3, axis=1))
    if layout == "conv_qkv_bias":
        return tuple(p.reshape(-1, H) for p in np.split(x, 3))
    raise AssertionError(layout)


def _to_hf(x, layout: str):
    if layout == "vector":
        return x
    if layout == "linear":
        return x.T
    if layout == "linear_to_heads":
        return x.reshape(x.shape[0], -1).T
    if layout == "linear_from_heads":
        return x.reshape(-1, x.shape[-1]).T
    if layout in ("bias_heads",):
        return x.reshape(-1)
    if layout == "conv_from_heads":
        return x.reshape(-1, x.shape[-1])
    if layout == "conv_qkv":
        return np.concatenate([p.reshape(p.shape[0], -1) for p in x], axis=1)
    if layout == "conv_qkv_bias":
        return np.concatenate([p.reshape(-1) for p in x])
    raise AssertionError(layout)


def _exists(flat: dict, path) -> bool:
    return path in flat


def hf_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, arch: str, expected: dict) -> dict:
    """HF tensors -> {jaxlm param path: array} for the paths in `expected` (path -> shape).

    Missing tensors, extra tensors and shape mismatches raise ConfigError naming them.
    """
    top, stacks = _layout(arch, cfg)
    out, used = {}, set()

    def take(name):
        if name not in tensors:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        used.add(name)
        return np.asarray(tensors[name])

    for name, path, layout in top:
        if path in expected:
            out[path] = _to_jax(take(name), layout, cfg)
    for prefix, root, table, layers in stacks:
        for suffix, (module, leaf), layout in table:
            leaves = leaf if isinstance(leaf, tuple) else (leaf,)
            paths = [(root, module, lf) for lf in leaves]
            if not all(p in expected for p in paths):
                continue
            per_layer = [_to_jax(take(prefix.format(i) + suffix), layout, cfg) for i in range(layers)]
            for j, p in enumerate(paths):
                out[p] = np.stack([x[j] if isinstance(x, tuple) else x for x in per_layer])
    tied = (
        {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.weight"}
        if cfg.tie_embeddings
        else set()
    )
    extra = sorted(n for n in set(tensors) - used - tied if not n.endswith(_BUFFERS))
    if extra:
        more = " ..." if len(extra) > 8 else ""
        raise ConfigError(f"checkpoint has tensors jaxlm's {arch} does not use: {extra[:8]}{more}")
    missing = sorted(".".join(p) for p in set(expected) - set(out))
    if missing:
        raise ConfigError(f"no checkpoint tensor for parameters {missing}")
    for p, x in out.items():
        if tuple(x.shape) != tuple(expected[p]):
            raise ConfigError(f"tensor for {'.'.join(p)} has shape {x.shape}, the config implies {expected[p]}")
    return out


def params_to_hf(params: dict, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """{jaxlm param path: array} -> HF tensor dict (contiguous NumPy arrays)."""
    top, stacks = _layout(arch, cfg)
    out = {}
    for name, path, layout in top:
        if path in params:
            out[name] = _to_hf(np.asarray(params[path]), layout)
    for prefix, root, table, layers in stacks:
        for suffix, (module, leaf), layout in table:
            leaves = leaf if isinstance(leaf, tuple) else (leaf,)
            paths = [(root, module, lf) for lf in leaves]
            if not all(p in params for p in paths):
                continue
            for i in range(layers):
                parts = [np.asarray(params[p][i]) for p in paths]
                out[prefix.format(i) + suffix] = _to_hf(tuple(parts) if len(parts) > 1 else parts[0], layout)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
