"""Family registry: every transformers config attribute is classified, published config.json files load and
compute what transformers computes, and keys that change the math are refused by name."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.hf import from_hf
from jaxlm.hf.common import CHECKED, NEUTRAL
from jaxlm.hf.families import FAMILIES, config_from_hf
from tests.parity import require

torch = require("torch")
transformers = require("transformers")

# Class-level settings of PreTrainedConfig (parallelism plans, loading hooks): never written to config.json.
CLASS_LEVEL = {"attribute_map", "sub_configs_defaults", "extra_config_files", "extra_files", "_auto_class"}


def attributes(cls) -> set[str]:
    """What a config class documents (annotations over its MRO) and what it writes to config.json."""
    names = set()
    for c in cls.__mro__:
        names |= set(getattr(c, "__annotations__", {}))
    names |= set(cls().to_dict())
    return {n for n in names if n not in CLASS_LEVEL and not n.startswith("base_model_")}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.rsplit(".", 1)[-1])
def test_every_config_attribute_is_mapped_checked_or_neutral(family):
    known = set(family.KEYS) | set(family.NEUTRAL) | NEUTRAL | set(CHECKED)
    for name in family.CONFIG_CLASSES:
        attrs = attributes(getattr(transformers, name))
        unclassified = sorted(attrs - known)
        assert not unclassified, f"{name}: attributes jaxlm neither maps, checks nor lists as neutral: {unclassified}"
        print(f"\n{name}: {len(attrs)} attributes classified ({len(attrs & set(family.KEYS))} mapped or checked)")


# config.json key sets of published checkpoints (values as published, sizes shrunk to test scale); the
# transformers versions that wrote them span 2.x (T5WithLMHeadModel) to 4.5x.
SMALL_LLAMA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)
PUBLISHED = {
    "gpt2": {  # openai-community/gpt2
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 1, "embd_pdrop": 0.1, "eos_token_id": 1, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2,
        "n_positions": 64, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 128,
    },
    "minilm": {  # sentence-transformers/all-MiniLM-L6-v2
        "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "position_embedding_type": "absolute",
        "transformers_version": "4.8.2", "type_vocab_size": 2, "use_cache": True, "vocab_size": 128,
    },
    "bert": {  # google-bert/bert-base-uncased
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 96, "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
        "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0, "position_embedding_type": "absolute",
        "transformers_version": "4.6.0.dev0", "type_vocab_size": 2, "use_cache": True, "vocab_size": 128,
    },
    "t5": {  # google-t5/t5-small (transformers 2.x era)
        "architectures": ["T5WithLMHeadModel"], "d_ff": 96, "d_kv": 16, "d_model": 64,
        "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
        "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 64,
        "num_heads": 4, "num_layers": 2, "output_past": True, "pad_token_id": 0,
        "relative_attention_num_buckets": 32, "task_specific_params": {"summarization": {"prefix": "summarize: "}},
        "vocab_size": 128,
    },
    "t5_v1_1": {  # google/t5-v1_1-small
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 96, "d_kv": 16, "d_model": 64,
        "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
        "num_decoder_layers": 2, "num_heads": 4, "num_layers": 2, "output_past": True, "pad_token_id": 0,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 128,
    },
    "llama2": {  # meta-llama/Llama-2-7b-hf
        **SMALL_LLAMA, "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 64, "model_type": "llama",
        "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0.dev0",
        "use_cache": True,
    },
    "llama3.1": {  # meta-llama/Llama-3.1-8B
        **SMALL_LLAMA, "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 128, "mlp_bias": False, "model_type": "llama", "num_key_value_heads": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True,
    },
    "mistral": {  # mistralai/Mistral-7B-v0.1
        **SMALL_LLAMA, "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 128, "model_type": "mistral",
        "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 8,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0",
        "use_cache": True,
    },
    "qwen2": {  # Qwen/Qwen2-0.5B
        **SMALL_LLAMA, "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 128,
        "max_window_layers": 24, "model_type": "qwen2", "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 128, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
    },
    "qwen3": {  # Qwen/Qwen3-0.6B
        **SMALL_LLAMA, "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 128, "max_window_layers": 28, "model_type": "qwen3", "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False,
    },
    "gemma2": {  # google/gemma-2-2b
        **SMALL_LLAMA, "num_hidden_layers": 4, "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "max_position_embeddings": 128,
        "model_type": "gemma2", "num_key_value_heads": 2, "pad_token_id": 0, "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 8, "torch_dtype": "float32",
        "transformers_version": "4.42.4", "use_cache": True,
    },
    "gemma3": {  # google/gemma-3-1b-pt
        **SMALL_LLAMA, "num_hidden_layers": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "max_position_embeddings": 128,
        "model_type": "gemma3_text", "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": 8, "sliding_window_pattern": 3, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0", "use_cache": True,
    },
    "phi3": {  # microsoft/Phi-3-mini-4k-instruct
        **SMALL_LLAMA, "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "bos_token_id": 1, "embd_pdrop": 0.0,
        "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 64,
        "model_type": "phi3", "num_key_value_heads": 4, "original_max_position_embeddings": 64, "pad_token_id": 0,
        "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "sliding_window": 11, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2", "use_cache": True,
    },
    "mixtral": {  # mistralai/Mixtral-8x7B-v0.1
        **SMALL_LLAMA, "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 128,
        "model_type": "mixtral", "num_experts_per_tok": 2, "num_key_value_heads": 2, "num_local_experts": 4,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True,
    },
    "qwen3_moe": {  # Qwen/Qwen3-30B-A3B
        **SMALL_LLAMA, "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "decoder_sparse_step": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 128, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 24, "norm_topk_prob": True, "num_experts": 8,
        "num_experts_per_tok": 3, "num_key_value_heads": 2, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False,
    },
    "gpt_oss": {  # openai/gpt-oss-20b (its quantization_config, MXFP4, left out: refused by name below)
        **SMALL_LLAMA, "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": 2, "experts_per_token": 2, "head_dim": 16, "hidden_act": "silu",
        "initial_context_length": 64, "initializer_range": 0.02, "intermediate_size": 96,
        "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 128,
        "model_type": "gpt_oss", "num_experts_per_tok": 2, "num_key_value_heads": 2, "num_local_experts": 4,
        "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 64, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 8, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True,
    },
    "deepseek_v3": {  # deepseek-ai/DeepSeek-V3 (its fp8 quantization_config left out: refused below)
        **SMALL_LLAMA, "num_hidden_layers": 3, "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1,
        "hidden_act": "silu", "initializer_range": 0.02, "kv_lora_rank": 16, "max_position_embeddings": 128,
        "model_type": "deepseek_v3", "moe_intermediate_size": 24, "moe_layer_freq": 1, "n_group": 4,
        "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True, "num_experts_per_tok": 2,
        "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "q_lora_rank": 24, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 2,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
        "v_head_dim": 8,
    },
}  # fmt: skip
HF_CLASSES = {"T5WithLMHeadModel": "T5ForConditionalGeneration"}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_loads_and_matches_transformers(name, tmp_path):
    published = PUBLISHED[name]
    arch = published["architectures"][0]
    cls = getattr(transformers, HF_CLASSES.get(arch, arch))
    torch.manual_seed(0)
    ref = cls(cls.config_class.from_dict(copy.deepcopy(published))).eval()  # from_dict edits its argument
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(published))  # the published keys, not the re-saved ones
    model, _, got_arch = from_hf(tmp_path)
    assert got_arch == arch
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, (2, 12))
    with torch.no_grad():
        if model.cfg.decoder_layers:
            tgt = rng.integers(3, 128, (2, 5))
            want = ref(input_ids=torch.tensor(tokens), decoder_input_ids=torch.tensor(tgt)).logits.numpy()
            got = np.asarray(model(jnp.asarray(tokens), jnp.asarray(tgt)))
        elif arch == "BertModel":
            want = ref(input_ids=torch.tensor(tokens)).last_hidden_state.numpy()
            got = np.asarray(model.hidden(jnp.asarray(tokens))[0])
        else:
            want = ref(input_ids=torch.tensor(tokens)).logits.numpy()
            got = np.asarray(model(jnp.asarray(tokens))[0])
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("llama2", {"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, "rope type 'ntk-by-parts'"),
        ("llama2", {"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True is not supported"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "does not apply it"),
        ("gemma3", {"layer_types": ["full_attention", "sliding_attention"] * 3}, "not a repeating pattern"),
        ("phi3", {"rope_scaling": {"rope_type": "longrope", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ("minilm", {"pruned_heads": {"0": [1]}}, "pruned_heads"),
        ("minilm", {"is_decoder": True}, "is_decoder=True"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ("t5", {"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "dense layers among the expert layers"),
        ("qwen3_moe", {"mlp_only_layers": [0]}, "dense layers among the expert layers"),
        ("gpt_oss", {"swiglu_alpha": 1.5}, "swiglu_alpha=1.5 is not supported"),
        ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=False is not supported"),
        ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads must equal num_attention_heads"),
        (
            "deepseek_v3",
            {
                "rope_scaling": {
                    "type": "linear",
                    "factor": 40,
                    "original_max_position_embeddings": 64,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                    "beta_fast": 32,
                    "beta_slow": 1,
                }
            },
            "unsupported rope parameters",
        ),
        ("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config"),
        ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention"]}, "not a repeating pattern"),
    ],
)
def test_keys_that_change_the_math_are_refused(name, change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**PUBLISHED[name], **change})


# Keys published checkpoints carry that are no attribute of their config class (transformers stores them and
# its modeling code never reads them); the first two were refused before the key policy (SmolLM2-135M-Instruct
# as transformers converts it from GGUF, a re-saved fine-tune).
NON_ATTRIBUTE_KEYS = {
    "unk_token_id": 0,
    "_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "attn_logit_softcapping": 30.0,  # Gemma's key on a LLaMA: LlamaForCausalLM does not soft-cap
    "max_new_tokens": 64,
    "chat_template": "{{ messages }}",
    "tokenizer_hints": {"padding_side": "left"},
}


@pytest.mark.parametrize("name", ["llama2", "qwen2", "gemma2", "phi3", "gpt2", "t5_v1_1"])
def test_keys_no_config_class_reads_are_accepted_with_identical_logits(name, tmp_path, caplog):
    published = PUBLISHED[name]
    arch = published["architectures"][0]
    cls = getattr(transformers, arch)
    # Gemma's config class has attn_logit_softcapping: the generated keys are those no attribute of this class.
    added = {k: v for k, v in NON_ATTRIBUTE_KEYS.items() if k not in attributes(cls.config_class)}
    assert len(added) >= len(NON_ATTRIBUTE_KEYS) - 1
    torch.manual_seed(0)
    ref = cls(cls.config_class.from_dict(copy.deepcopy(published))).eval()
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(published))
    plain, _, _ = from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**published, **added}))
    with caplog.at_level("DEBUG", logger="jaxlm.hf.common"):
        extra, _, _ = from_hf(tmp_path)
    assert "unk_token_id" in caplog.text and "_model_name_or_path" in caplog.text
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 12)))
    if plain.cfg.decoder_layers:
        got, want = extra(tokens, tokens[:, :5]), plain(tokens, tokens[:, :5])
    else:
        got, want = extra(tokens)[0], plain(tokens)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_on_the_cpu_points_to_the_bf16_weights_path(tmp_path, caplog):
    """XLA:CPU has no fast bf16 matmul (measured ~10x slower decoding): loading in bf16 on a CPU says so."""
    published = PUBLISHED["gpt2"]
    cls = transformers.GPT2LMHeadModel
    cls(cls.config_class.from_dict(copy.deepcopy(published))).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="jaxlm.hf.io"):
        from_hf(tmp_path)
        assert "bfloat16 on the CPU" not in caplog.text
        model, _, _ = from_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
    assert "bfloat16 on the CPU" in caplog.text and "--weights bf16" in caplog.text
    assert model.cfg.param_dtype == "bfloat16"
