"""GGUF files (llama.cpp's single-file format) -> jaxlm, through the `gguf` package (llama.cpp's own reader and
dequantizers; no parser of ours).

The file is turned into what a Hugging Face directory holds, then loaded as one (`jaxlm.hf.io`), so every
family table and check applies unchanged:
- its `{arch}.*` metadata becomes a config.json dict;
- its tensors, dequantized to float32 from any type the package dequantizes (F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, Q5_x, the K-quants, ...), are renamed to Hugging Face names; llama.cpp stores LLaMA's q/k rows
  permuted for its interleaved RoPE, which is undone here (as transformers does);
- its tokenizer (`tokenizer.ggml.*`) is rebuilt as a `tokenizers` BPE, with control tokens special, and the
  chat template from `tokenizer.chat_template`: byte-level BPE (`gpt2`) from its merges; SentencePiece BPE
  (`llama`: Llama 2, Mistral, Phi-3, Gemma) with byte fallback, its merges recovered from the token scores
  (llama.cpp merges the adjacent pair whose result scores highest);
- Gemma's norm weights, which llama.cpp stores as 1 + w, get the 1 taken off; Phi-3's fused qkv and gate-up
  matrices are Hugging Face's own fused tensors.
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
    "phi3": ("Phi3ForCausalLM", "phi3", False),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", False),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False),
}
GEMMA = ("gemma2", "gemma3")
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
_GEMMA_NORMS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Where an architecture names a layer tensor differently from LLaMA
ARCH_LAYER_TENSORS = {
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
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
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
PHI3_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # Phi-3's LongRoPE, as tensors
# Metadata that does not change the function: descriptions, the quantization label, llama.cpp's own hints.
NEUTRAL_PREFIXES = ("general.", "GGUF.", "tokenizer.", "quantize.", "split.")
NEUTRAL_KEYS = {"vocab_size", "attention.value_length"}
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
    tensors = _tensors(path, reader, hf, arch)
    if ROPE_FREQS in tensors:
        _rope_freqs(path, hf, tensors.pop(ROPE_FREQS))
    if any(name in tensors for name in PHI3_ROPE_FACTORS):
        _phi3_rope_factors(path, hf, meta, tensors)
    tokenizer = _tokenizer(path, meta, arch)
    return hf, tensors, tokenizer


def _config(path: Path, arch: str, meta: dict, tensor_names: set[str]) -> dict:
    cls, model_type, _ = ARCHITECTURES[arch]
    hf = {"architectures": [cls], "model_type": model_type}
    if arch in GEMMA:
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        hf["hidden_act"] = "silu"
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
        elif name in ("rope.scaling.factor", "rope.scaling.original_context_length", "rope.dimension_count"):
            pass  # read below, with what they qualify
        elif name == "rope.scaling.attn_factor" and arch == "phi3":
            pass  # read with Phi-3's factor tensors
        elif name == "attention.sliding_window_pattern" and arch in GEMMA:
            _sliding_pattern(path, hf, value)
        elif name not in NEUTRAL_KEYS:
            raise ConfigError(f"{path}: unsupported GGUF metadata key {key!r}")
    heads = hf.get("num_attention_heads")
    head_dim = hf.get("head_dim") or (heads and hf.get("hidden_size", 0) // heads)
    rotary = meta.get(prefix + "rope.dimension_count")
    if rotary is not None and head_dim and int(rotary) != head_dim:
        raise ConfigError(
            f"{path}: {prefix}rope.dimension_count={rotary} rotates part of each {head_dim}-wide head (partial "
            "RoPE), which jaxlm does not support"
        )
    if arch == "phi3" and prefix + "rope.scaling.original_context_length" in meta:
        hf["original_max_position_embeddings"] = int(meta[prefix + "rope.scaling.original_context_length"])
    if arch in GEMMA:
        _gemma_config(hf, arch)
    kind = meta.get(prefix + "rope.scaling.type", "none")
    if kind != "none":
        scaling = {"rope_type": kind, "factor": float(meta[prefix + "rope.scaling.factor"])}
        if prefix + "rope.scaling.original_context_length" in meta and arch != "phi3":
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


def _gemma_config(hf: dict, arch: str) -> None:
    """What llama.cpp does not write but fixes by model size: the attention scale is head_dim^-1/2, except for
    the 27B models (46 layers for Gemma 2, 62 for Gemma 3), whose query_pre_attn_scalar is hidden/heads; Gemma
    3's local RoPE base is 10,000."""
    big = hf.get("num_hidden_layers") == (46 if arch == "gemma2" else 62)
    heads = hf["num_attention_heads"]
    hf["query_pre_attn_scalar"] = hf["hidden_size"] // heads if big else hf.get("head_dim", hf["hidden_size"] // heads)
    if arch == "gemma3":
        hf["rope_local_base_freq"] = 10_000.0


def _sliding_pattern(path: Path, hf: dict, value) -> None:
    """`attention.sliding_window_pattern`: every n-th layer global (a number), or one flag a layer (true: sliding)."""
    if isinstance(value, (list, tuple)):
        hf["layer_types"] = ["sliding_attention" if v else "full_attention" for v in value]
    elif isinstance(value, int) and value > 0:
        hf["sliding_window_pattern"] = value
    else:
        raise ConfigError(f"{path}: attention.sliding_window_pattern {value!r} is neither a layer count nor flags")


def _tensors(path: Path, reader, hf: dict, arch: str) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permuted = ARCHITECTURES[arch][2]
    out = {}
    for t in reader.tensors:
        name = _hf_name(path, t.name, arch)
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
        if arch in GEMMA and t.name.endswith("norm.weight"):
            x = x - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w)
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


def _phi3_rope_factors(path: Path, hf: dict, meta: dict, tensors: dict) -> None:
    """Phi-3's LongRoPE, which llama.cpp writes as two factor tensors and an attention factor."""
    if not all(name in tensors for name in PHI3_ROPE_FACTORS):
        raise ConfigError(f"{path}: Phi-3 LongRoPE needs both {' and '.join(PHI3_ROPE_FACTORS)}")
    if "original_max_position_embeddings" not in hf:
        raise ConfigError(f"{path}: Phi-3 LongRoPE needs phi3.rope.scaling.original_context_length")
    long, short = ([float(f) for f in tensors.pop(name).reshape(-1)] for name in PHI3_ROPE_FACTORS)
    hf["rope_scaling"] = {"rope_type": "longrope", "long_factor": long, "short_factor": short}
    if meta.get("phi3.rope.scaling.attn_factor") is not None:
        hf["rope_scaling"]["attention_factor"] = float(meta["phi3.rope.scaling.attn_factor"])


def _hf_name(path: Path, name: str, arch: str) -> str:
    if name == ROPE_FREQS or (arch == "phi3" and name in PHI3_ROPE_FACTORS):
        return name  # not weights: read into the RoPE settings
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    table = {**LAYER_TENSORS, **ARCH_LAYER_TENSORS.get(arch, {})}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}"
    raise ConfigError(f"{path}: GGUF tensor {name!r} has no Hugging Face counterpart jaxlm reads")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (rotate-half -> interleaved pairs, per head): (out, in)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(path: Path, meta: dict, arch: str) -> BPETokenizer:
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or ())
    if kind not in ("gpt2", "llama"):
        raise ConfigError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (jaxlm rebuilds byte-level BPE, 'gpt2', and "
            "SentencePiece BPE, 'llama')"
        )
    if not tokens:
        raise DataError(f"{path}: no tokenizer.ggml.tokens")
    tok, vocab, control = (
        _byte_level(path, meta, tokens) if kind == "gpt2" else _sentencepiece(path, meta, tokens, arch)
    )
    types = list(meta.get("tokenizer.ggml.token_type") or ())
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


def _byte_level(path: Path, meta: dict, tokens: list[str]):
    """GPT-2-style byte-level BPE: (tokenizer, vocab, control tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_SPLITS and pre not in GPT2_SPLIT_PRES:
        raise ConfigError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({sorted(PRE_SPLITS)} or GPT-2's)")
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
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocab
    control = [t for t, k in zip(tokens, types) if k == 3 and set(t) <= letters]  # 3: CONTROL
    return tok, vocab, control


def _sentencepiece(path: Path, meta: dict, tokens: list[str], arch: str):
    """SentencePiece BPE with byte fallback (`<0x0A>` tokens): (tokenizer, vocab, control tokens).

    A file lists its merges or only scores; then the merges are every split of a token into two tokens,
    ranked by the token's score (Gemma: by its place in the file, as its scores do not follow its merge order).
    Text becomes pieces as each family's tokenizer does: `▁` for a space, a leading `▁` on the text (unless
    `tokenizer.ggml.add_space_prefix` is false); Phi-3 prefixes through a normaliser (two leading spaces stay
    three `▁`), Gemma adds no prefix and its files spell multi-space tokens with real spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    gemma = arch in GEMMA
    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    scores = [-float(i) for i in range(len(tokens))] if gemma else list(meta.get("tokenizer.ggml.scores") or ())
    vocab = {t: i for i, t in enumerate(tokens)}
    listed = meta.get("tokenizer.ggml.merges")
    if listed:
        merges = [tuple(m.split(" ", 1)) for m in listed]
    else:
        if len(scores) != len(tokens):
            raise DataError(f"{path}: a SentencePiece vocabulary without merges needs a score per token")
        merges = _merges_from_scores(tokens, scores, vocab)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    pieces = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
    elif arch == "phi3" and prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        scheme = "first" if prefix else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    if prefix:
        pieces.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(pieces)
    types = list(meta.get("tokenizer.ggml.token_type") or ())
    control = [t for t, k in zip(tokens, types) if k == 3]  # 3: CONTROL
    return tok, vocab, control


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best-scoring result first (then the longer left part,
    then the longer right part; ties keep file order)."""
    found = []
    for token, score in zip(tokens, scores):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = sorted(
            (lr for lr in splits if lr[0] in vocab and lr[1] in vocab), key=lambda lr: (vocab[lr[0]], vocab[lr[1]])
        )
        found += [(-float(score), -len(left), -len(right), left, right) for left, right in splits]
    found.sort(key=lambda m: m[:3])  # stable
    return [(left, right) for *_, left, right in found]


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
