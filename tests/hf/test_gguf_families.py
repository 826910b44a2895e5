"""GGUF beyond byte-level LLaMA: SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
Phi-3, Gemma) and the Phi-3, Gemma 2 and Gemma 3 tensor layouts. Files are written the way llama.cpp's
converter writes them (tensor names from the gguf package's own map, Gemma norms stored as 1 + w, scores and
no merges), then read by jaxlm and by transformers' GGUF loader."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.hf.gguf import from_gguf, read_gguf
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
gguf = require("gguf")

TEXT = "Hello world! Ça va très bien. Привет, мир. 12345 + 678 = 1 2 3.\n  two spaces\n" * 12
# Never in the training text: encoded through byte fallback (<0xE6>...), and a user-defined token.
PROBES = [TEXT, "日本語のテキスト <start_of_turn>user\nhi<end_of_turn>", "  hi   there\n\n", "", "ÿ"]
GEMMA = ("gemma2", "gemma3")


def sentencepiece_vocab(arch: str):
    """(tokens, scores, types) as llama.cpp writes a SentencePiece BPE vocabulary: specials, 256 byte tokens,
    then pieces scored by merge rank; two user-defined tokens at the end. Gemma's files spell tokens of only
    spaces with real spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    gemma = arch in GEMMA
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + ["<start_of_turn>", "<end_of_turn>"]
    types = [2 if t == "<unk>" else 3 if t in specials else 6 if t in byte_tokens else 1 for t in tokens]
    types[-2:] = [4, 4]
    scores = [-float(i) if k == 1 else 0.0 for i, k in enumerate(types)]
    if gemma:
        tokens = [" " * len(t) if len(t) > 1 and not t.strip("\u2581") else t for t in tokens]
    return tokens, scores, types


def write(path, arch: str, model=None, *, vocab=None, meta=None, tensors=None):
    """A llama.cpp-style file: `model` (a transformers model) or a token table only. meta: GGUFWriter `add_*`
    calls that replace or add to the model's (rope_dimension_count=8 calls add_rope_dimension_count(8));
    tensors: more float32 tensors by GGUF name."""
    tokens, scores, types = vocab or sentencepiece_vocab(arch)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_bos_token_id(tokens.index("<bos>" if arch in GEMMA else "<s>"))
    w.add_eos_token_id(tokens.index("<eos>" if arch in GEMMA else "</s>"))
    w.add_pad_token_id(0)
    for name, x in (tensors or {}).items():
        w.add_tensor(name, np.asarray(x, np.float32))
    if model is None:
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    else:
        c = model.config
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = c.rope_parameters.get("full_attention", c.rope_parameters)
        keys = dict(context_length=c.max_position_embeddings, embedding_length=c.hidden_size,
                    block_count=c.num_hidden_layers, feed_forward_length=c.intermediate_size,
                    head_count=c.num_attention_heads, head_count_kv=c.num_key_value_heads,
                    layer_norm_rms_eps=c.rms_norm_eps, rope_freq_base=rope["rope_theta"], rope_dimension_count=head,
                    key_length=head, value_length=head)  # fmt: skip
        if getattr(c, "sliding_window", None):
            keys["sliding_window"] = c.sliding_window
        if arch == "gemma2":
            keys.update(attn_logit_softcapping=c.attn_logit_softcapping,
                        final_logit_softcapping=c.final_logit_softcapping)  # fmt: skip
        for key, value in {**keys, **(meta or {})}.items():
            getattr(w, f"add_{key}")(value)
        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
        for hf_name, t in model.state_dict().items():
            if hf_name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            x = t.numpy().astype(np.float32)
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if arch in GEMMA and name.endswith("norm.weight"):
                x = x + 1  # llama.cpp's Gemma converter
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_sentencepiece_vocabulary_encodes_as_transformers(tmp_path, arch):
    """Scores without merges, byte fallback for unseen characters, user-defined tokens whole, each family's
    prefix-space rule (Llama: Metaspace; Phi-3: a normaliser; Gemma: none), the same ids as transformers'
    GGUF tokenizer, and the same text decoded (up to the leading space its decoder strips)."""
    path = tmp_path / "vocab.gguf"
    write(path, arch)
    _, _, ours = read_gguf_tokenizer(path, arch)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids).lstrip(" ") == ref.decode(ids).lstrip(" ")  # up to the prefix space it strips
    assert "<0xE6>" in {ours.piece(i) for i in ours.encode(PROBES[1])}  # byte fallback was exercised


def read_gguf_tokenizer(path, arch):
    from gguf import GGUFReader

    from jaxlm.hf.gguf import _tokenizer

    meta = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    return meta, arch, _tokenizer(path, meta, arch)


def tiny(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)  # fmt: skip
    if arch == "phi3":
        cfg = transformers.Phi3Config(**common, num_hidden_layers=2, sliding_window=64, pad_token_id=0)
        cls = transformers.Phi3ForCausalLM
    elif arch == "gemma2":  # head_dim = query_pre_attn_scalar: what llama.cpp assumes below 27B
        cfg = transformers.Gemma2Config(**common, num_hidden_layers=2, head_dim=32, query_pre_attn_scalar=32,
                                        sliding_window=8, pad_token_id=0)  # fmt: skip
        cls = transformers.Gemma2ForCausalLM
    else:  # 6 layers: five local (RoPE base 10k, window 8), one global (1M)
        cfg = transformers.Gemma3TextConfig(**common, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                            sliding_window=8, pad_token_id=0)  # fmt: skip
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from their initial values, so an offset error shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["phi3", "gemma2", "gemma3"])
def test_family_file_is_the_model_it_was_written_from(tmp_path, arch):
    """Fused qkv/gate-up (Phi-3), norm offsets, post-norms, soft-caps, sliding windows and per-layer RoPE bases
    (Gemma): jaxlm's logits equal those of the transformers model the file was written from, and jaxlm reads
    the same tensors as transformers' own GGUF loader."""
    vocab = sentencepiece_vocab(arch)
    ref = tiny(arch, len(vocab[0]))
    path = tmp_path / f"{arch}.gguf"
    write(path, arch, ref, vocab=vocab)
    model, _, name = from_gguf(path)
    assert name == type(ref).__name__
    ids = np.random.default_rng(0).integers(0, len(vocab[0]), (2, 24))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids))[0])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    _, tensors, _ = read_gguf(path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = loaded.state_dict()
    for key, x in tensors.items():
        np.testing.assert_allclose(x, state[key].numpy(), atol=1e-6, err_msg=key)


def test_phi3_long_rope_factor_tensors(tmp_path):
    """Phi-3's LongRoPE as llama.cpp writes it (two factor tensors, the original context, an attention factor)
    is Phi-3's `rope_scaling`; positions past the original context use the long factors."""
    vocab = sentencepiece_vocab("phi3")
    ref = tiny("phi3", len(vocab[0]))
    half = ref.config.hidden_size // ref.config.num_attention_heads // 2
    long, short = np.linspace(1.0, 4.0, half), np.linspace(1.0, 1.5, half)
    cfg = ref.config
    cfg.original_max_position_embeddings = 32
    cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long.tolist(),
                           "short_factor": short.tolist(), "original_max_position_embeddings": 32}  # fmt: skip
    scaled = transformers.Phi3ForCausalLM(cfg).eval()
    scaled.load_state_dict(ref.state_dict())
    attn = float(np.sqrt(1 + np.log(128 / 32) / np.log(32)))
    path = tmp_path / "long.gguf"
    meta = {"rope_scaling_orig_ctx_len": 32, "rope_scaling_attn_factors": attn}
    write(path, "phi3", ref, vocab=vocab, meta=meta,
          tensors={"rope_factors_long.weight": long, "rope_factors_short.weight": short})  # fmt: skip
    model, _, _ = from_gguf(path)
    assert model.cfg.rope_scaling == "longrope" and model.cfg.rope_original_max_len == 32
    ids = np.random.default_rng(1).integers(0, len(vocab[0]), (1, 48))  # past the original 32: long factors
    with torch.no_grad():
        want = scaled(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids))[0])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_unsupported_sentencepiece_cases_are_named(tmp_path):
    tokens, scores, types = sentencepiece_vocab("llama")
    path = tmp_path / "noscores.gguf"
    write(path, "llama", vocab=(tokens, scores[:-1], types))
    with pytest.raises(Exception, match="score per token"):
        read_gguf_tokenizer(path, "llama")
    vocab = sentencepiece_vocab("phi3")
    ref = tiny("phi3", len(vocab[0]))
    path = tmp_path / "partial.gguf"
    write(path, "phi3", ref, vocab=vocab, meta={"rope_dimension_count": 8})
    with pytest.raises(ConfigError, match="partial"):
        from_gguf(path)
