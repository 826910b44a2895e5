"""GGUF files (llama.cpp's single-file format) -> jaxlm, through the `gguf` package (llama.cpp's own reader and
dequantizers; no parser of ours).

The file is turned into what a Hugging Face directory holds, then loaded as one (`jaxlm.hf.io`), so every
family table and check applies unchanged:
- its `{arch}.*` metadata becomes a config.json dict;
- its tensors, dequantized to float32 from any type the package dequantizes (F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, Q5_x, the K-quants, ...), are renamed to Hugging Face names; llama.cpp stores LLaMA's q/k rows
  permuted for its interleaved RoPE, which is undone here (as transformers does);
- its tokenizer (`tokenizer.ggml.*`, byte-level BPE) is rebuilt as a `tokenizers` BPE, with control tokens
  special, and the chat template from `tokenizer.chat_template`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from jaxlm.data.tokenizer import BPETokenizer, DataError
from jaxlm.errors import ConfigError

log = logging.getLogger(__name__)

# general.architecture -> (Hugging Face class, model_type, q/k rows permuted by llama.cpp's converter)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}  # fmt: skip
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # per-frequency RoPE divisors (llama.cpp's freq_factors)
# {arch}.<key> -> config.json key
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
}
# Metadata that does not change the function: descriptions, the quantization label, llama.cpp's own hints.
NEUTRAL_PREFIXES = ("general.", "GGUF.", "tokenizer.", "quantize.", "split.")
NEUTRAL_KEYS = {"vocab_size", "rope.dimension_count", "attention.value_length"}
# The pre-tokenizer splits of `tokenizer.ggml.pre` (llama.cpp's names) that are not GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
              "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}  # fmt: skip
GPT2_SPLIT_PRES = {None, "default", "gpt2", "gpt-2", "smollm", "starcoder", "refact"}  # GPT-2's own regex


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray], BPETokenizer]:
    """(config.json dict, {Hugging Face tensor name: float32 array}, tokenizer) of a GGUF file.

    DataError names the file when it is missing, truncated or corrupt; ConfigError names an architecture,
    tensor type or metadata key jaxlm cannot honour. Everything is read before anything is returned."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise DataError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors / OSError on truncated or foreign files
        raise DataError(f"cannot read {path} as GGUF: {type(e).__name__}: {e}") from None
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise DataError(f"cannot read metadata {key!r} of {path}: {type(e).__name__}: {e}") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (jaxlm reads {sorted(ARCHITECTURES)})")
    hf = _config(path, arch, meta, {t.name for t in reader.tensors})
    tensors = _tensors(path, reader, hf, ARCHITECTURES[arch][2])
    if ROPE_FREQS in tensors:
        _rope_freqs(path, hf, tensors.pop(ROPE_FREQS))
    tokenizer = _tokenizer(path, meta)
    return hf, tensors, tokenizer


def _config(path: Path, arch: str, meta: dict, tensor_names: set[str]) -> dict:
    cls, model_type, _ = ARCHITECTURES[arch]
    hf = {"architectures": [cls], "model_type": model_type, "hidden_act": "silu"}
    prefix = f"{arch}."
    for key, value in meta.items():
        if not key.startswith(prefix):
            if not key.startswith(NEUTRAL_PREFIXES):
                raise ConfigError(f"{path}: unsupported GGUF metadata key {key!r}")
            continue
        name = key[len(prefix) :]
        if name in CONFIG_KEYS:
            hf[CONFIG_KEYS[name]] = value
        elif name == "rope.scaling.type":
            if value not in ("none", "linear", "yarn"):
                raise ConfigError(f"{path}: GGUF rope.scaling.type {value!r} is not supported (none, linear, yarn)")
        elif name in ("rope.scaling.factor", "rope.scaling.original_context_length"):
            pass  # read with rope.scaling.type below
        elif name not in NEUTRAL_KEYS:
            raise ConfigError(f"{path}: unsupported GGUF metadata key {key!r}")
    kind = meta.get(prefix + "rope.scaling.type", "none")
    if kind != "none":
        scaling = {"rope_type": kind, "factor": float(meta[prefix + "rope.scaling.factor"])}
        if prefix + "rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[prefix + "rope.scaling.original_context_length"])
        hf["rope_scaling"] = scaling
    tokens = meta.get("tokenizer.ggml.tokens")
    hf["vocab_size"] = int(meta.get(prefix + "vocab_size") or len(tokens or ()))
    hf["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch == "qwen3":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    elif arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            hf[name] = int(meta[f"tokenizer.ggml.{key}"])
    return hf


def _tensors(path: Path, reader, hf: dict, permuted: bool) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name = _hf_name(path, t.name)
        try:
            x = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise ConfigError(
                f"{path}: tensor {t.name} has type {GGMLQuantizationType(t.tensor_type).name}, which the gguf "
                "package cannot dequantize"
            ) from None
        except Exception as e:  # a truncated file reads short
            raise DataError(f"cannot read tensor {t.name} of {path}: {type(e).__name__}: {e}") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        if x.size != int(np.prod(shape)):
            raise DataError(f"{path}: tensor {t.name} holds {x.size} values for shape {shape} (truncated?)")
        x = x.reshape(shape)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf["num_attention_heads"] if "q_proj" in name else hf["num_key_value_heads"]
            x = _unpermute(x, heads)
        out[name] = x
    return out


def _rope_freqs(path: Path, hf: dict, factors: np.ndarray) -> None:
    """llama.cpp's `rope_freqs.weight` (Llama 3.1's GGUFs carry the llama3 scaling this way): per-frequency
    divisors, theta_i / factors[i] at every position. In config.json terms that is LongRoPE with equal short
    and long factors, no extension factor and no attention scaling."""
    if "rope_scaling" in hf:
        raise ConfigError(f"{path}: rope_freqs.weight together with rope.scaling.type is not supported")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    half = hf.get("head_dim", width // heads) // 2
    factors = [float(f) for f in np.asarray(factors, np.float64).reshape(-1)]
    if len(factors) != half or not all(f > 0 for f in factors):
        raise ConfigError(f"{path}: rope_freqs.weight must hold {half} positive factors (head_dim / 2)")
    hf["rope_scaling"] = {
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": factors,
        "original_max_position_embeddings": hf["max_position_embeddings"],
        "factor": 1.0,
        "attention_factor": 1.0,
    }


def _hf_name(path: Path, name: str) -> str:
    if name == ROPE_FREQS:
        return ROPE_FREQS  # not a weight: read into the RoPE settings (`_rope_freqs`)
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise ConfigError(f"{path}: GGUF tensor {name!r} has no Hugging Face counterpart jaxlm reads")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (rotate-half -> interleaved pairs, per head): (out, in)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(path: Path, meta: dict) -> BPETokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (jaxlm rebuilds byte-level BPE, 'gpt2')"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_SPLITS and pre not in GPT2_SPLIT_PRES:
        raise ConfigError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({sorted(PRE_SPLITS)} or GPT-2's)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    alphabet = _byte_alphabet()
    # A byte-level vocabulary spells every token in the byte alphabet; respell any the file wrote as text.
    spelled = [t if set(t) <= set(alphabet.values()) else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    split = PRE_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type") or ())
    letters = set(alphabet.values())
    control = [t for t, k in zip(tokens, types) if k == 3 and set(t) <= letters]  # 3: CONTROL
    user = [t for t, k in zip(tokens, types) if k == 4 and t in vocab]  # 4: USER_DEFINED, matched whole
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):  # fmt: skip
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            special[name] = tokens[int(i)]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    return BPETokenizer(tok, None if eos is None else int(eos), chat_template=template, special_tokens=special)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def from_gguf(path: str | Path, *, dtype: str = "float32", param_dtype: str = "float32"):
    """Loads a GGUF file: returns (TransformerLM, tokenizer, Hugging Face architecture)."""
    from jaxlm.hf.io import model_from_tensors

    hf, tensors, tokenizer = read_gguf(path)
    model, arch = model_from_tensors(hf, tensors, dtype=dtype, param_dtype=param_dtype)
    log.info("loaded %s from %s", arch, path)
    return model, tokenizer, arch


__all__ = ["from_gguf", "read_gguf"]
