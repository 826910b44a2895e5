"""Reward models (model.head=score) against transformers' ...ForSequenceClassification: import, export, scores.

transformers scores each row at its last token that is not pad_token_id; jaxlm at its last valid token. Rows are
right-padded with the pad id, so both read the same position.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, load_config
from jaxlm.hf import from_hf, to_hf
from jaxlm.nn.models import build_model
from jaxlm.ops.preference import last_token
from tests.parity import require

torch = require("torch")
transformers = require("transformers")

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
PAD = 5
CASES = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", dict(SMALL, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForSequenceClassification", dict(SMALL, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForSequenceClassification", dict(SMALL, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForSequenceClassification", dict(SMALL, bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
}


def _rows(seed=0, B=3, T=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, 128, size=(B, T))
    lengths = np.array([T, 7, 3])[:B]
    valid = np.arange(T)[None] < lengths[:, None]
    return np.where(valid, tokens, PAD), valid


def _hf_scores(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _ours(model, tokens, valid):
    scores, _ = model(jnp.asarray(tokens), valid=jnp.asarray(valid))
    return np.asarray(last_token(scores, jnp.asarray(valid)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, tmp_path):
    config_cls, cls, kw = CASES[case]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, config_cls)(**kw, num_labels=1, pad_token_id=PAD, max_position_embeddings=64)
    if case == "gpt2":
        hf_cfg = getattr(transformers, config_cls)(**kw, num_labels=1, pad_token_id=PAD, n_positions=64)
    hf = getattr(transformers, cls)(hf_cfg).eval()
    torch.nn.init.normal_(hf.score.weight, std=0.5)
    hf.save_pretrained(tmp_path)
    model, _, arch = from_hf(tmp_path)
    assert arch == cls and model.cfg.head == "score" and model.cfg.num_labels == 1
    tokens, valid = _rows()
    np.testing.assert_allclose(_ours(model, tokens, valid), _hf_scores(hf, tokens), rtol=1e-4, atol=1e-4)


def test_export_loads_in_transformers_with_the_same_scores(tmp_path):
    base = load_config("configs/llama_tiny.yaml").model
    model = build_model(dataclasses.replace(base, head="score", vocab_size=128, num_kv_heads=2), rngs=nnx.Rngs(3))
    arch = to_hf(model, tmp_path / "rm")
    assert arch == "LlamaForSequenceClassification"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == arch and hf.config.num_labels == 1
    tokens, valid = _rows(seed=1)
    hf.config.pad_token_id = PAD  # our tokens pad with PAD; the export names end-of-text (none here)
    np.testing.assert_allclose(_ours(model, tokens, valid), _hf_scores(hf, tokens), rtol=1e-4, atol=1e-4)
    back, _, _ = from_hf(tmp_path / "rm")
    np.testing.assert_allclose(_ours(back, tokens, valid), _ours(model, tokens, valid), rtol=1e-6)


def test_score_head_needs_a_causal_decoder():
    with pytest.raises(ConfigError, match="head=score"):
        load_config("configs/bert_tiny.yaml", ["model.head=score"])
