"""GGUF import: files written with the `gguf` package the way llama.cpp's converter writes them (q/k rows
permuted, norms in F32, quantized matrices), read by jaxlm and by transformers' own GGUF loader."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.tokenizer import BPETokenizer, DataError
from jaxlm.errors import ConfigError
from jaxlm.hf.gguf import from_gguf, read_gguf
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
gguf = require("gguf")
Q = gguf.GGMLQuantizationType

TEXT = "Hello world! Ça va très bien. 日本語のテキスト. Привет, мир. 12345 + 678 = 1 2 3.\n" * 20
# The K-quants' float16 scale fields (byte offsets in a block) and a size that keeps weights near 0.1: random
# blocks with these set are valid data (the gguf package quantizes no K-quant).
K_SCALES = {Q.Q2_K: ((80, 82), 2e-3), Q.Q3_K: ((108,), 1e-3), Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 5e-5),
            Q.Q6_K: ((208,), 2e-5)}  # fmt: skip
TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def tiny_tokenizer():
    tok = BPETokenizer.train([TEXT], vocab_size=300)
    raw = json.loads(tok._tok.to_str())
    vocab = raw["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    return tok, tokens, merges


def hf_llama(vocab: int):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half q/k rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offsets, size_ = K_SCALES[qtype]
    for offset in offsets:
        scale = rng.uniform(0.5 * size_, size_, (rows, cols // block)).astype(np.float16)
        data[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def write_gguf(path, model, tokens, merges, types, *, arch="llama", chat_template=None, rope_freqs=None):
    """The model as llama.cpp writes it: metadata, tokenizer, tensors (matrices cycle through `types`);
    rope_freqs: llama.cpp's per-frequency RoPE divisors tensor (Llama 3.1's files)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if chat_template:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    rng = np.random.default_rng(0)
    i = 0
    for hf_name, t in model.state_dict().items():
        x = t.numpy().astype(np.float32)
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, n, rest = hf_name.split(".", 3)
            name = f"blk.{n}.{layer[rest.rsplit('.', 1)[0]]}.weight"
            if "q_proj" in rest:
                x = permute(x, c.num_attention_heads)
            elif "k_proj" in rest:
                x = permute(x, c.num_key_value_heads)
        qtype = Q.F32 if x.ndim == 1 else types[i % len(types)]
        i += x.ndim > 1
        if qtype in K_SCALES:
            w.add_tensor(name, k_quant_blocks(rng, *x.shape, qtype), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tokenizer_parts():
    return tiny_tokenizer()


def test_float32_file_is_the_model_it_was_written_from(tmp_path, tokenizer_parts):
    """All F32: jaxlm's model computes the Hugging Face model's logits (so the q/k un-permutation is right),
    and the rebuilt tokenizer encodes as the one it came from."""
    tok, tokens, merges = tokenizer_parts
    ref = hf_llama(len(tokens))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, ref, tokens, merges, [Q.F32], chat_template="{{ messages[0]['content'] }}")
    model, gtok, arch = from_gguf(path)
    assert arch == "LlamaForCausalLM" and model.cfg.num_kv_heads == 2 and not model.cfg.tie_embeddings
    ids = np.asarray([tok.encode(TEXT[:80])])
    assert gtok.encode(TEXT) == tok.encode(TEXT)
    assert gtok.chat_template == "{{ messages[0]['content'] }}" and gtok.eos_id == 0
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids))[0])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_rope_frequency_factors_divide_each_frequency(tmp_path, tokenizer_parts):
    """`rope_freqs.weight` (how llama.cpp stores Llama 3.1's llama3 scaling): theta_i / factor_i at every
    position. The reference is transformers' Llama with the same divisors as LongRoPE factors (short = long,
    no extension), on the model the file was written from; positions run past the context to show that the
    factors hold everywhere."""
    _, tokens, merges = tokenizer_parts
    ref = hf_llama(len(tokens))
    half = ref.config.hidden_size // ref.config.num_attention_heads // 2
    # llama3's shape: high frequencies kept, low ones divided by 8, a smooth band between.
    factors = np.concatenate([np.ones(half // 2), np.linspace(1.0, 8.0, half - half // 2)]).astype(np.float32)
    path = tmp_path / "freqs.gguf"
    write_gguf(path, ref, tokens, merges, [Q.F32], rope_freqs=factors)
    model, _, _ = from_gguf(path)
    assert model.cfg.rope_scaling == "longrope" and np.allclose(model.cfg.rope_short_factor, factors)
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors.tolist(),
              "long_factor": factors.tolist(), "original_max_position_embeddings": 128, "factor": 1.0,
              "attention_factor": 1.0}  # fmt: skip
    cfg = ref.config
    cfg.rope_parameters = params
    scaled = transformers.LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(ref.state_dict())
    ids = np.random.default_rng(0).integers(0, len(tokens), (2, 40))
    positions = np.broadcast_to(np.arange(100, 140), (2, 40))
    with torch.no_grad():
        want = scaled(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
        plain = ref(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(positions))[0])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    # The factors changed the function, by more than the tolerance above.
    assert np.abs(got - plain).max() > 5e-4 * np.abs(plain).max() > 5 * np.abs(got - want).max()
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, ref, tokens, merges, [Q.F32], rope_freqs=factors[:-1])
    with pytest.raises(ConfigError, match="rope_freqs.weight must hold"):
        from_gguf(bad)


def test_every_tensor_type_matches_transformers_gguf_loading(tmp_path, tokenizer_parts):
    """F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K: the gguf package's dequantizers
    (jaxlm) and transformers' own give the same model."""
    tok, tokens, merges = tokenizer_parts
    path = tmp_path / "mixed.gguf"
    write_gguf(path, hf_llama(len(tokens)), tokens, merges, TYPES)
    written = {Q(t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    assert set(TYPES) <= written
    model, gtok, _ = from_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    _, tensors, _ = read_gguf(path)
    state = ref.state_dict()
    for name, x in tensors.items():
        np.testing.assert_array_equal(x, state[name].numpy(), err_msg=name)
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert gtok.encode(TEXT) == ref_tok(TEXT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([tok.encode(TEXT[:80])])
    with torch.no_grad():
        want = ref.eval()(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids))[0])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_truncated_file_is_named_and_convert_writes_nothing(tmp_path, tokenizer_parts):
    from jaxlm.hf.convert import gguf_to_run

    tok, tokens, merges = tokenizer_parts
    path = tmp_path / "whole.gguf"
    write_gguf(path, hf_llama(len(tokens)), tokens, merges, [Q.Q8_0])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match="cut.gguf"):
        from_gguf(cut)
    with pytest.raises(DataError, match="cut.gguf"):
        gguf_to_run(cut, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(DataError, match="empty.gguf"):
        from_gguf(tmp_path / "empty.gguf")
    with pytest.raises(DataError, match="not found"):
        from_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_tokenizer_are_named(tmp_path, tokenizer_parts):
    tok, tokens, merges = tokenizer_parts
    path = tmp_path / "falcon.gguf"
    write_gguf(path, hf_llama(len(tokens)), tokens, merges, [Q.F16], arch="falcon")
    with pytest.raises(ConfigError, match="architecture 'falcon' is not supported"):
        from_gguf(path)
