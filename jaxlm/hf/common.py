"""What the Hugging Face families share: the strict config reader, the keys no family's math depends on,
activation names, RoPE parameters in both directions, and tensor layout transforms.

torch `nn.Linear` stores (out, in); jaxlm stores (in, out) with heads split out:
q (D, N, H), k/v (D, K, H), o (N, H, D). GPT-2's `Conv1D` already stores (in, out).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from jaxlm.errors import ConfigError

log = logging.getLogger(__name__)

# Keys of any config.json that do not change the network's function: identity and bookkeeping, token ids,
# generation defaults (transformers < 5 wrote them into config.json), runtime switches that keep the math
# (caching, attention kernels, gradient checkpointing, TorchScript), and heads jaxlm does not build.
NEUTRAL = frozenset(
    """
    architectures model_type transformers_version torch_dtype dtype _name_or_path _commit_hash auto_map
    _attn_implementation attn_implementation _attn_implementation_autoset base_config_key
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    use_cache cache_implementation output_attentions output_hidden_states return_dict use_return_dict output_past
    torchscript use_bfloat16 gradient_checkpointing xla_device chunk_size_feed_forward tf_legacy_loss
    id2label label2id num_labels problem_type finetuning_task tokenizer_class prefix task_specific_params
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k
    top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens cross_attention_hidden_size
    """.split()
)
# Keys any config.json may carry that change the function unless they hold this value.
# (A family that supports another value reads the key itself.)
CHECKED = {
    "pruned_heads": ({},),
    "tie_encoder_decoder": (False,),
    "quantization_config": (None,),
    "is_encoder_decoder": (False,),
    "is_decoder": (False,),
    "add_cross_attention": (False,),
}

# Hugging Face activation names -> jaxlm's.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "quick_gelu": "quick_gelu",
}
HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
HF_ACTIVATION["quick_gelu"] = "quick_gelu"


class Reader:
    """Takes keys out of a config.json dict, so that whatever is left over can be judged.

    `keys` are the keys the family declares it maps or checks (the attributes of its transformers config
    classes that change the function): reading any other is a bug in the family.

    The key policy: a key is refused only when transformers' config class reads it (it is one of `keys` or
    `CHECKED`) and jaxlm does not implement its value. A key that is no attribute of the class is stored by
    transformers but never read by its modeling code (metadata such as `_name_or_path`, token ids such as
    `unk_token_id`, tokenizer hints): it is accepted and mentioned at debug level.
    """

    def __init__(self, hf: dict, where: str, keys: frozenset, neutral: frozenset):
        self.hf, self.where, self.keys, self.neutral, self.used = hf, where, keys, neutral, set()
        self.ignored: list[str] = []  # keys no config class of the family reads

    def get(self, key, default=...):
        assert key in self.keys, f"{self.where}: reads {key!r}, which the family does not declare"
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

    def activation(self, key, default, allowed=tuple(ACTIVATIONS)) -> str:
        return ACTIVATIONS[self.expect(key, allowed, default)]

    def finish(self):
        for key, allowed in CHECKED.items():
            if key in self.hf and key not in self.used and self.hf[key] not in allowed:
                raise ConfigError(f"{self.where}: {key}={self.hf[key]!r} is not supported (jaxlm implements {allowed})")
        left = set(self.hf) - self.used - NEUTRAL - self.neutral - set(CHECKED)
        # An attribute of the config class that the family left unread may change the function: refused.
        unread = sorted(left & self.keys)
        if unread:
            raise ConfigError(
                f"{self.where}: unsupported config.json keys {unread}; jaxlm would not compute the same model"
            )
        self.ignored = sorted(left)
        if self.ignored:
            log.debug(
                "%s: config.json keys that no config class of the family reads, ignored: %s", self.where, self.ignored
            )


ROPE_NAMES = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "rope_original_max_len",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "beta_fast": "rope_beta_fast",
    "beta_slow": "rope_beta_slow",
    "attention_factor": "rope_attention_factor",
    "short_factor": "rope_short_factor",
    "long_factor": "rope_long_factor",
}
ROPE_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta"})
MSCALE_KEYS = ("mscale", "mscale_all_dim")  # YaRN's (DeepSeek's): read with a yarn rope type


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude scale, 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale(r: Reader) -> float:
    """The factor latent-attention models (DeepSeek) fold into q.k's scale under YaRN: yarn_mscale(factor,
    mscale_all_dim)^2, or 1 (transformers' `yarn_apply_mscale`)."""
    params = dict(r.get("rope_parameters", None) or {})
    params.update(r.get("rope_scaling", None) or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default" or not params.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(_yarn_factor(r, params), params["mscale_all_dim"]) ** 2


def _yarn_factor(r: Reader, params: dict) -> float:
    """YaRN's factor, or max_position_embeddings over the original length when the file leaves it out."""
    return params.get("factor") or r.get("max_position_embeddings") / params["original_max_position_embeddings"]


def rope_params(r: Reader, params: dict | None = None, theta_default: float = 10000.0) -> dict:
    """ModelConfig RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x),
    or from `params` (one entry of a per-layer-type `rope_parameters`)."""
    if params is None:
        params = dict(r.get("rope_parameters", None) or {})
        params.update(r.get("rope_scaling", None) or {})
        top = r.get("rope_theta", None)  # 4.x; transitional files carry it beside rope_parameters too
        theta = params.pop("rope_theta", None) or top or theta_default
    else:
        params = dict(params)
        theta = params.pop("rope_theta", theta_default)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind in ("su", "yarn") and ("short_factor" in params or "long_factor" in params):
        kind = "longrope"  # Phi-3's early names for LongRoPE
    out = {"rope_theta": float(theta)}
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{r.where}: partial_rotary_factor != 1 is not supported (RoPE on every head dim)")
    if kind == "default":
        return out
    if kind not in ("linear", "dynamic", "yarn", "llama3", "longrope"):
        raise ConfigError(f"{r.where}: rope type {kind!r} is not supported (linear, dynamic, yarn, llama3, longrope)")
    mscale, mscale_all_dim = (params.pop(k, None) if kind == "yarn" else None for k in MSCALE_KEYS)
    if mscale and mscale_all_dim and params.get("attention_factor") is None:  # transformers' YaRN rule
        factor = _yarn_factor(r, params)
        params["attention_factor"] = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    unknown = sorted(set(params) - set(ROPE_NAMES) - {"truncate"})
    if unknown:
        raise ConfigError(f"{r.where}: unsupported rope parameters {unknown}")
    if params.pop("truncate", True) is not True:
        if kind != "yarn":
            raise ConfigError(f"{r.where}: rope parameter truncate=False applies to yarn, not {kind}")
        out["rope_truncate"] = False
    out["rope_scaling"] = kind
    for k, v in params.items():
        if k in ROPE_NAMES and v is not None:
            out[ROPE_NAMES[k]] = tuple(float(x) for x in v) if isinstance(v, list) else v
    if kind == "dynamic":  # scales against max_position_embeddings
        out["rope_original_max_len"] = r.get("max_position_embeddings")
    if kind == "longrope":
        top = "original_max_position_embeddings"  # Phi-3 keeps it beside rope_parameters
        original = out.get("rope_original_max_len") or (r.get(top, None) if top in r.keys else None)
        if not original:
            raise ConfigError(f"{r.where}: longrope needs original_max_position_embeddings")
        out["rope_original_max_len"] = original
        out.setdefault("rope_factor", r.get("max_position_embeddings") / original)
    return out


def rope_to_hf(cfg, *, theta: float | None = None, scaling: str | None = None) -> dict:
    """`rope_parameters` for cfg's RoPE (or for the given theta, unscaled)."""
    scaling = cfg.rope_scaling if scaling is None else scaling
    rope = {"rope_theta": cfg.rope_theta if theta is None else theta, "rope_type": "default"}
    if scaling == "none":
        return rope
    rope.update(rope_type=scaling, factor=cfg.rope_factor)
    if scaling in ("yarn", "llama3", "longrope"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_len
    if scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if scaling == "yarn":
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
    if scaling == "longrope":
        rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
    if scaling in ("yarn", "longrope") and cfg.rope_attention_factor:
        rope["attention_factor"] = cfg.rope_attention_factor
    return rope


def max_positions(cfg) -> int:
    """`max_position_embeddings`: dynamic NTK scales against it, so it is the pre-training length there."""
    return cfg.rope_original_max_len if cfg.rope_scaling == "dynamic" else cfg.max_seq_len


# Fields only some families implement (gpt-oss): every other family's `architecture` wants these values.
PLAIN_BLOCK = dict(attention_sinks=False, mlp_clamp=0.0, mlp_up_shift=0.0, kv_lora_rank=0, first_dense_layers=0)
PLAIN_BLOCK.update(router_balance=False, router_groups=0, router_group_limit=0)


def global_every(types: list[str], where: str, layers: int) -> int | None:
    """`ModelConfig.global_every` for per-layer `layer_types` (None: every layer global)."""
    if set(types) - {"full_attention", "sliding_attention"} or len(types) != layers:
        raise ConfigError(f"{where}: layer_types {types} must name each of the {layers} layers full or sliding")
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return None
    for every in [0, *range(2, layers + 1)]:
        if local == [not (every and (i + 1) % every == 0) for i in range(layers)]:
            return every
    raise ConfigError(
        f"{where}: layer_types {types} is not a repeating pattern of sliding layers closed by a global one"
    )


def layer_types(cfg) -> list[str]:
    """`layer_types` of cfg's layers: sliding_attention or full_attention each."""
    return ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.num_layers)]


def mismatches(cfg, want: dict, family: str) -> list[str]:
    """The fields of cfg that differ from `want`, as 'field=value (family needs x)'."""
    return [f"{k}={getattr(cfg, k)!r} ({family} needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]


# Tensor layouts: (HF array, cfg) -> jaxlm array (a tuple for fused tensors) and back.
def to_jax(x: np.ndarray, layout: str, cfg):
    D, H, F = cfg.d_model, cfg.dim_per_head, cfg.mlp_dim
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
    if layout == "linear_qkv":  # (N H + 2 K H, D) -> (D, N, H), 2 x (D, K, H)
        n = cfg.num_heads * H
        return tuple(p.T.reshape(D, -1, H) for p in np.split(x, [n, n + cfg.kv_heads * H]))
    if layout == "linear_gate_up":  # (2 F, D) -> 2 x (D, F)
        return tuple(p.T for p in np.split(x, [F]))
    if layout == "interleaved_pair":  # (..., 2 F) with pairs side by side (gpt-oss's gate_up) -> 2 x (..., F)
        return x[..., ::2], x[..., 1::2]
    if layout in ("mla_q", "mla_kv_a"):  # latent attention, RoPE pairs interleaved -> halves (see mla_rope_order)
        y = x.T
        if layout == "mla_q":
            y = y.reshape(y.shape[0], cfg.num_heads, -1)
        return y[..., mla_rope_order(y.shape[-1], cfg.qk_rope_head_dim)]
    if layout == "mla_kv_b":  # (N (Hn + Hv), R) -> (R, N, Hn + Hv)
        return x.T.reshape(x.shape[1], cfg.num_heads, -1)
    if layout == "mla_o":  # (D, N Hv) -> (N, Hv, D)
        return x.T.reshape(cfg.num_heads, -1, x.shape[0])
    raise AssertionError(layout)


def mla_rope_order(width: int, rope: int) -> np.ndarray:
    """Indices that move the last `rope` of `width` features from DeepSeek's interleaved RoPE pairs (x0, x1),
    (x2, x3), ... to jaxlm's halves (x0, x2, ..., x1, x3, ...): transformers' rope_interleave computes exactly
    half-split RoPE on the de-interleaved features, so the weights' rows are reordered once at load."""
    first = width - rope
    return np.concatenate([np.arange(first), first + np.arange(0, rope, 2), first + np.arange(1, rope, 2)])


def to_hf(x, layout: str, cfg=None):
    if layout == "vector":
        return x
    if layout == "linear":
        return x.T
    if layout == "linear_to_heads":
        return x.reshape(x.shape[0], -1).T
    if layout == "linear_from_heads":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "bias_heads":
        return x.reshape(-1)
    if layout == "conv_from_heads":
        return x.reshape(-1, x.shape[-1])
    if layout == "conv_qkv":
        return np.concatenate([p.reshape(p.shape[0], -1) for p in x], axis=1)
    if layout == "conv_qkv_bias":
        return np.concatenate([p.reshape(-1) for p in x])
    if layout == "linear_qkv":
        return np.concatenate([p.reshape(p.shape[0], -1).T for p in x])
    if layout == "linear_gate_up":
        return np.concatenate([p.T for p in x])
    if layout == "interleaved_pair":
        return np.stack(x, axis=-1).reshape(*x[0].shape[:-1], -1)
    if layout in ("mla_q", "mla_kv_a"):
        y = x[..., np.argsort(mla_rope_order(x.shape[-1], cfg.qk_rope_head_dim))]
        return y.reshape(y.shape[0], -1).T
    if layout == "mla_kv_b":
        return x.reshape(x.shape[0], -1).T
    if layout == "mla_o":
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(layout)
