"""BERT against transformers: BertModel hidden states and pooler, BertForMaskedLM logits, round trips."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.hf import from_hf, to_hf
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
safetensors_numpy = require("safetensors.numpy")

CONFIG = dict(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 120, (3, 16))
    mask = np.ones((3, 16), bool)
    mask[1, 10:] = False  # right padding, as BERT tokenizers pad
    mask[2, 6:] = False
    types = (np.arange(16) >= 8).astype(np.int64)[None].repeat(3, 0)
    return tokens, mask, types


@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM"])
def test_bert_matches_transformers(cls, tmp_path):
    torch.manual_seed(0)
    ref = getattr(transformers, cls)(transformers.BertConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    model, _, arch = from_hf(tmp_path / "hf")
    assert arch == cls and not model.cfg.causal

    tokens, mask, types = batch()
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            token_type_ids=torch.tensor(types),
        )
    args = (jnp.asarray(tokens), None, jnp.asarray(mask))
    if cls == "BertModel":
        hidden, _ = model.hidden(*args, token_types=jnp.asarray(types))
        diff = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[mask].max()
        pooled = np.asarray(model.pool(hidden))
        np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)
    else:
        logits, _ = model(*args, token_types=jnp.asarray(types))
        diff = np.abs(np.asarray(logits) - out.logits.numpy())[mask].max()
    assert diff < 1e-4, diff
    print(f"\nparity {cls}: max|d| {diff:.2e}")

    to_hf(model, tmp_path / "back")
    original = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    written = safetensors_numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    reloaded = getattr(transformers, cls).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = reloaded(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            token_type_ids=torch.tensor(types),
        )
    key = "last_hidden_state" if cls == "BertModel" else "logits"
    np.testing.assert_allclose(getattr(again, key).numpy()[mask], getattr(out, key).numpy()[mask], atol=1e-5)
