"""jaxlm against transformers (torch CPU) for the decoder families: logits, greedy decoding, round trips.

Each test builds a small random transformers model, saves it with
`save_pretrained` (safetensors), loads it with `jaxlm.from_hf`, and compares.
"""

import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.generate import Generator
from jaxlm.hf import from_hf, to_hf
from jaxlm.hf.families import llama
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
safetensors_numpy = require("safetensors.numpy")

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
PHI3_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi-3's defaults (32000) exceed the tiny vocab
CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, max_position_embeddings=128)),
    "llama_bias_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(SMALL, attention_bias=True, tie_word_embeddings=True, max_position_embeddings=128),
    ),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            SMALL,
            num_key_value_heads=1,
            max_position_embeddings=128,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "mistral_window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(SMALL, num_key_value_heads=2, sliding_window=8, max_position_embeddings=128),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, max_position_embeddings=128)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            SMALL,
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=1.0,
            final_logit_softcapping=0.5,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            SMALL,
            num_hidden_layers=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(SMALL, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_bias=True),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(SMALL, **PHI3_IDS, num_key_value_heads=2, max_position_embeddings=128),
    ),
    "phi3_longrope_window": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            SMALL,
            **PHI3_IDS,
            max_position_embeddings=128,
            original_max_position_embeddings=16,
            sliding_window=12,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
                long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0],
            ),
        ),
    ),
    # Mixtures of experts: top-k routing is discontinuous, so the routers are drawn large (`hf_model`) to keep
    # every token's choice well clear of a tie.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(SMALL, num_key_value_heads=2, num_local_experts=4)),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(SMALL, num_key_value_heads=2, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            SMALL,
            num_key_value_heads=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_experts=4,
            max_window_layers=2,
        ),
    ),
    "gpt_oss": (  # sinks, alternating sliding windows, biased experts and router, clamped SwiGLU, YaRN untruncated
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(SMALL, num_key_value_heads=2, head_dim=16, num_local_experts=4, sliding_window=6, swiglu_limit=0.5),
    ),
    "deepseek_v3": (  # latent attention (q and kv ranks), a dense first layer, sigmoid group-limited routing
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            SMALL,
            num_hidden_layers=3,
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=12,
            v_head_dim=10,
            n_group=4,
            topk_group=2,
            max_position_embeddings=128,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        ),
    ),
}
# YaRN with DeepSeek's mscale and mscale_all_dim: q.k scaled on every dim, not only the rotated ones
CASES["deepseek_v3_yarn"] = (
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    dict(CASES["deepseek_v3"][2], rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=0.8,
        mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0,
    )),
)  # fmt: skip


def hf_model(case, directory):
    config_cls, model_cls, kw = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kw)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms and biases too, so that every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("gate.weight", "router.weight", "sinks")):  # routers of mixtures of experts, sinks
                p.normal_(0, 0.5)
        for name, buffer in model.named_buffers():  # DeepSeek's selection bias
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    model.save_pretrained(directory)
    return model


def padded_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (3, 20))
    mask = np.ones((3, 20), bool)
    mask[1, :5] = False  # left padding
    mask[2, :11] = False
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return tokens, mask, positions


def hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


def jax_logits(model, tokens, mask, positions):
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    return np.asarray(logits)


RESULTS = {}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_generation_and_round_trip(case, tmp_path):
    ref = hf_model(case, tmp_path / "hf")
    t = time.perf_counter()
    model, _, arch = from_hf(tmp_path / "hf")
    load_s = time.perf_counter() - t
    assert arch == CASES[case][1]

    tokens, mask, positions = padded_batch()
    want = hf_logits(ref, tokens, mask, positions)
    got = jax_logits(model, tokens, mask, positions)
    diff = float(np.abs(got - want)[mask].max())
    assert diff < 1e-4, diff

    # Greedy decoding, 32 new tokens, with the KV cache.
    prompt = tokens[0, :7].tolist()
    with torch.no_grad():
        hf_out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    hf_new = hf_out[0, len(prompt) :].tolist()
    ours = Generator(model).generate([prompt], max_new_tokens=32, temperature=0.0)[0]
    assert ours == hf_new

    # to_hf reproduces every tensor bit for bit, and transformers reads what it wrote.
    to_hf(model, tmp_path / "back", architecture=arch)
    original = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    written = safetensors_numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(written) == sorted(k for k in original if k in written)
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    reloaded = getattr(transformers, CASES[case][1]).from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask, positions)[mask], want[mask], atol=1e-5)
    RESULTS[case] = (arch, diff, ours == hf_new, load_s)
    print(f"\nparity {case}: {arch} max|dlogits| {diff:.2e} greedy-32 match {ours == hf_new} load {load_s:.2f} s")


def test_sharded_checkpoint_index(tmp_path):
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _, _ = from_hf(tmp_path)
    tokens, mask, positions = padded_batch()
    np.testing.assert_allclose(
        jax_logits(model, tokens, mask, positions)[mask], hf_logits(ref, tokens, mask, positions)[mask], atol=1e-4
    )


def test_unsupported_keys_and_architectures_are_named(tmp_path, monkeypatch):
    hf_model("llama_gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    # An attribute of the config class (a future transformers key, say) that the family does not map: refused.
    monkeypatch.setattr(llama, "KEYS", llama.KEYS | {"new_math_key"})
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "new_math_key": 30.0}))
    with pytest.raises(ConfigError, match=r"unsupported config.json keys \['new_math_key'\]"):
        from_hf(tmp_path)
    monkeypatch.undo()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "tanh"}))
    with pytest.raises(ConfigError, match="hidden_act='tanh' is not supported"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported Hugging Face architecture.*FalconForCausalLM"):
        from_hf(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    from jaxlm.data.tokenizer import DataError

    with pytest.raises(DataError, match="not found"):
        from_hf(tmp_path / "nothing")
    hf_model("qwen2", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot read .*model.safetensors"):
        from_hf(tmp_path)
    weights.unlink()
    with pytest.raises(DataError, match="neither model.safetensors nor"):
        from_hf(tmp_path)
