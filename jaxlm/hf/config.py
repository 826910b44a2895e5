"""Hugging Face `config.json` <-> `ModelConfig` for the decoder families.

Every key of a config.json is either mapped, checked to have the one value
jaxlm implements, or listed as not affecting the computation (token ids,
cache flags, classification heads jaxlm does not build). Dropout rates are
mapped to `dropout` / `attention_dropout` / `mlp_dropout` (they act only in training). Any
other key, or an unsupported value, raises ConfigError naming it.
"""

from __future__ import annotations

import logging

from jaxlm.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "T5ForConditionalGeneration": "t5",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MODEL_TYPES.update(gpt2="GPT2LMHeadModel", bert="BertModel", t5="T5ForConditionalGeneration")

# Keys with no effect on the network's function.
NEUTRAL = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}
# Dropout of classification heads (GPT2DoubleHeadsModel, BertForSequenceClassification), not of these models.
NEUTRAL |= {"summary_first_dropout", "classifier_dropout"}
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
}
ACTIVATIONS.update({"relu": "relu"})


class _Reader:
    """Takes keys out of a config dict, so that whatever is left over can be reported."""

    def __init__(self, hf: dict, where: str):
        self.hf, self.where, self.used = hf, where, set()

    def get(self, key, default=...):
        self.used.add(key)
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if default is ...:
            raise ConfigError(f"{self.where}: config.json lacks {key!r}")
        return default

    def expect(self, key, allowed, default=None):
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{self.where}: {key}={value!r} is not supported (jaxlm implements {allowed})")
        return value

    def finish(self):
        left = sorted(set(self.hf) - self.used - NEUTRAL)
        if left:
            raise ConfigError(
                f"{self.where}: unsupported config.json keys {left}; jaxlm would not compute the same model"
            )


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[hf["model_type"]]
    raise ConfigError(
        f"unsupported Hugging Face architecture {archs or hf.get('model_type')!r}; jaxlm reads {sorted(ARCHITECTURES)}"
    )


def _rope(r: _Reader) -> dict:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(r.get("rope_parameters", None) or {})
    scaling = r.get("rope_scaling", None)
    if scaling:
        params.update(scaling)
    theta = params.pop("rope_theta", None) or r.get("rope_theta", 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    names = {
        "factor": "rope_factor",
        "original_max_position_embeddings": "rope_original_max_len",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "beta_fast": "rope_beta_fast",
        "beta_slow": "rope_beta_slow",
        "attention_factor": "rope_attention_factor",
    }
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(f"{r.where}: rope type {kind!r} is not supported (linear, dynamic, yarn, llama3)")
    unknown = sorted(set(params) - set(names) - {"truncate"})
    if unknown or params.get("truncate", True) is not True:
        raise ConfigError(f"{r.where}: unsupported rope parameters {unknown or ['truncate=False']}")
    out["rope_scaling"] = kind
    for k, v in params.items():
        if k in names and v is not None:
            out[names[k]] = v
    if kind == "dynamic":  # scales against max_position_embeddings
        out["rope_original_max_len"] = r.get("max_position_embeddings")
    return out


def config_from_hf(hf: dict, tensor_names=()) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) for a config.json dict (and the checkpoint's tensor names, which tell
    whether T5's read-out has its own matrix)."""
    arch = architecture_of(hf)
    r = _Reader(hf, arch)
    if arch == "T5ForConditionalGeneration":
        ff = r.expect("feed_forward_proj", ("relu", "gated-gelu", "gated-relu", "gelu"), "relu")
        gated, act = ff.startswith("gated"), ff.split("-")[-1]
        dense_act = r.get("dense_act_fn", None)
        act = "gelu_new" if ff == "gated-gelu" else dense_act or act  # transformers maps gated-gelu to gelu_new
        r.get("is_gated_act", None)
        r.expect("is_encoder_decoder", (True,), True)
        r.expect("is_decoder", (False,), False)
        start = r.get("decoder_start_token_id", None)
        start = hf.get("pad_token_id", 0) if start is None else start
        r.get("initializer_factor", None)
        tied_flag = r.get("tie_word_embeddings", True)
        # transformers >= 5 writes scale_decoder_outputs; older configs say tie_word_embeddings=false for v1.1.
        scale = r.get("scale_decoder_outputs", tied_flag is not False)
        rate = float(r.get("dropout_rate", 0.1))
        if rate:
            log.info("%s: dropout_rate %s on embeddings, branches, MLP hidden states, attention weights", arch, rate)
        cfg = ModelConfig(
            vocab_size=r.get("vocab_size"),
            d_model=r.get("d_model"),
            num_layers=r.get("num_layers"),
            decoder_layers=r.get("num_decoder_layers", None) or hf["num_layers"],
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
        r.finish()
        return cfg, arch
    if arch == "GPT2LMHeadModel":
        d = r.get("n_embd")
        r.expect("scale_attn_weights", (True,), True)
        r.expect("scale_attn_by_inverse_layer_idx", (False,), False)
        r.expect("add_cross_attention", (False,), False)
        r.get("reorder_and_upcast_attn", False)  # float32 attention scores: jaxlm always upcasts them
        for k in ("summary_activation", "summary_proj_to_labels", "summary_type", "summary_use_proj"):
            r.get(k, None)  # GPT2DoubleHeadsModel's classification head; not part of the LM
        act = r.expect("activation_function", tuple(ACTIVATIONS), "gelu_new")
        resid, embd = float(r.get("resid_pdrop", 0.1)), float(r.get("embd_pdrop", 0.1))
        if embd != resid:
            log.warning(
                "%s: embd_pdrop %s differs from resid_pdrop %s; jaxlm uses %s for both", arch, embd, resid, resid
            )
        cfg = ModelConfig(
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
            activation=ACTIVATIONS[act],
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            norm_bias=True,
            tie_embeddings=r.expect("tie_word_embeddings", (True,), True),
            dropout=resid,
            attention_dropout=float(r.get("attn_pdrop", 0.1)),
            init_std=r.get("initializer_range", 0.02),
        )
        r.finish()
        return cfg, arch

    if arch in ("BertModel", "BertForMaskedLM"):
        r.expect("is_decoder", (False,), False)
        r.expect("add_cross_attention", (False,), False)
        r.expect("position_embedding_type", ("absolute",), "absolute")
        act = r.expect("hidden_act", ("gelu", "gelu_new", "relu"), "gelu")
        cfg = ModelConfig(
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
            activation=ACTIVATIONS[act],
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
        r.finish()
        return cfg, arch

    d, n = r.get("hidden_size"), r.get("num_attention_heads")
    act = r.expect("hidden_act", ("silu", "swish"), "silu")
    qkv_bias = out_bias = mlp_bias = False
    window = 0
    if arch == "LlamaForCausalLM":
        qkv_bias = out_bias = bool(r.get("attention_bias", False))
        mlp_bias = bool(r.get("mlp_bias", False))
        r.expect("pretraining_tp", (1,), 1)
    elif arch == "MistralForCausalLM":
        window = r.get("sliding_window", None) or 0
    elif arch == "Qwen2ForCausalLM":
        qkv_bias = True
        r.expect("use_sliding_window", (False,), False)
        r.get("sliding_window", None)  # used only with use_sliding_window
        r.get("max_window_layers", None)
        types = set(r.get("layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ConfigError(f"{arch}: layer_types {sorted(types)} are not supported (full_attention only)")
    cfg = ModelConfig(
        vocab_size=r.get("vocab_size"),
        d_model=d,
        num_layers=r.get("num_hidden_layers"),
        num_heads=n,
        num_kv_heads=r.get("num_key_value_heads", n),
        head_dim=r.get("head_dim", None) or d // n,
        mlp_dim=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        position="rope",
        norm="rmsnorm",
        norm_eps=r.get("rms_norm_eps", 1e-6),
        mlp="gated",
        activation=ACTIVATIONS[act],
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        norm_bias=False,
        tie_embeddings=bool(r.get("tie_word_embeddings", False)),
        sliding_window=window,
        attention_dropout=float(r.get("attention_dropout", 0.0)),  # these models have no residual dropout
        init_std=r.get("initializer_range", 0.02),
        **_rope(r),
    )
    r.finish()
    return cfg, arch


def architecture_for(cfg: ModelConfig) -> str:
    """The Hugging Face class that computes what `cfg` does; ConfigError when there is none."""
    problems = []
    if cfg.decoder_layers:
        want = dict(position="relative", norm="rmsnorm", norm_position="pre", qkv_bias=False, out_bias=False)
        want.update(mlp_bias=False, attention_scale=1.0, embed_scale=False)
        problems = [f"{k}={getattr(cfg, k)!r} (T5 needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if cfg.kv_heads != cfg.num_heads:
            problems.append("grouped-query attention")
        arch = "T5ForConditionalGeneration"
    elif not cfg.causal:
        want = dict(position="learned", norm="layernorm", norm_position="post", mlp="plain", qkv_bias=True)
        want.update(out_bias=True, mlp_bias=True, norm_bias=True, tie_embeddings=True, embed_norm=True, num_kv_heads=0)
        problems = [f"{k}={getattr(cfg, k)!r} (BERT needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        arch = "BertForMaskedLM" if cfg.head == "mlm" else "BertModel"
        if cfg.head == "mlm" and cfg.pooler:
            problems.append("a pooler with the MLM head (BertForMaskedLM has none)")
        if cfg.head == "lm" and not cfg.pooler:
            problems.append("no pooler (BertModel has one)")
    elif cfg.position == "learned":
        want = dict(norm="layernorm", mlp="plain", qkv_bias=True, out_bias=True, mlp_bias=True, norm_bias=True)
        want.update(tie_embeddings=True, norm_position="pre", num_kv_heads=0, sliding_window=0)
        problems = [f"{k}={getattr(cfg, k)!r} (GPT-2 needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if cfg.num_kv_heads not in (0, cfg.num_heads):
            problems.append("grouped-query attention")
        arch = "GPT2LMHeadModel"
    elif cfg.position == "rope":
        want = dict(norm="rmsnorm", mlp="gated", activation="silu", norm_position="pre", mlp_bias=False)
        problems = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
        if cfg.sliding_window:
            arch = "MistralForCausalLM"
            if cfg.qkv_bias or cfg.out_bias:
                problems.append("attention biases with a sliding window")
        elif cfg.qkv_bias and not cfg.out_bias:
            arch = "Qwen2ForCausalLM"
        elif cfg.qkv_bias != cfg.out_bias:
            arch = "LlamaForCausalLM"
            problems.append("an output bias without q/k/v biases")
        else:
            arch = "LlamaForCausalLM"
    else:
        raise ConfigError(
            f"no Hugging Face class implements model.position={cfg.position!r} among {sorted(ARCHITECTURES)}"
        )
    if problems:
        raise ConfigError(f"the model cannot be written as {arch}: " + "; ".join(problems))
    return arch


def config_to_hf(cfg: ModelConfig, arch: str, *, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json dict for `cfg` as `arch`."""
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "architectures": [arch], "model_type": ARCHITECTURES[arch]}
    family = ARCHITECTURES[arch]
    if family == "t5" and not cfg.attention_dropout == cfg.mlp_dropout == cfg.dropout:
        log.warning(
            "%s has one dropout_rate: writing model.dropout %s, not attention_dropout %s or mlp_dropout %s",
            arch,
            cfg.dropout,
            cfg.attention_dropout,
            cfg.mlp_dropout,
        )
    if family != "t5" and cfg.mlp_dropout:
        log.warning("%s has no MLP hidden dropout: model.mlp_dropout %s is not written", arch, cfg.mlp_dropout)
    if family in ("llama", "mistral", "qwen2") and cfg.dropout:
        log.warning("%s has no residual dropout: model.dropout %s is not written", arch, cfg.dropout)
    if arch == "T5ForConditionalGeneration":
        act = {"relu": "relu", "gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.activation]
        return {
            **ids,
            "pad_token_id": 0,
            "decoder_start_token_id": max(cfg.decoder_start_id, 0)
            if eos_id is None
            else (eos_id if cfg.decoder_start_id < 0 else cfg.decoder_start_id),
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
    if ARCHITECTURES[arch] == "bert":
        return {
            **ids,
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
    if arch == "GPT2LMHeadModel":
        return {
            **ids,
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": {v: k for k, v in ACTIVATIONS.items()}[cfg.activation]
            if cfg.activation != "gelu_tanh"
            else "gelu_new",
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": True,
            "attn_pdrop": cfg.attention_dropout,
            "embd_pdrop": cfg.dropout,
            "resid_pdrop": cfg.dropout,
        }
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
        if cfg.rope_scaling in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = cfg.rope_original_max_len
        if cfg.rope_scaling == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
        if cfg.rope_scaling == "yarn":
            rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
            if cfg.rope_attention_factor:
                rope["attention_factor"] = cfg.rope_attention_factor
    max_pos = cfg.rope_original_max_len if cfg.rope_scaling == "dynamic" else cfg.max_seq_len
    out = {
        **ids,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_parameters": rope,
        "attention_dropout": cfg.attention_dropout,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    elif arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False)
    return out
