"""Mixtures of experts from Hugging Face (the parity cases of test_decoder_parity.py): KV-cached decoding, one
token at a time, equals the full forward, and the router's choices match transformers'."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.hf import from_hf
from jaxlm.nn.moe import router_stats
from tests.hf.test_decoder_parity import hf_model, jax_logits, padded_batch
from tests.parity import require

torch = require("torch")


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_cached_decode_equals_full_forward_and_routing_matches(case, tmp_path):
    ref = hf_model(case, tmp_path)
    model, _, _ = from_hf(tmp_path)
    tokens = padded_batch()[0][:1, :12]
    cache = model.init_cache(1, 16)
    steps = []
    for t in range(12):
        logits, cache = model.decode(jnp.asarray(tokens[:, t : t + 1]), jnp.full((1, 1), t), cache=cache, cache_index=t)
        steps.append(np.asarray(logits[:, 0]))
    with router_stats() as found:
        full = jax_logits(model, tokens, np.ones_like(tokens, bool), np.arange(12)[None])
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(tokens), output_router_logits=True)
    # transformers' router logits per layer (T, E): the same top-k experts, so the same load per expert
    for layer, logits in enumerate(out.router_logits):
        k = model.cfg.experts_per_token
        chosen = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices.numpy()
        load = np.bincount(chosen.ravel(), minlength=model.cfg.num_experts)
        np.testing.assert_array_equal(np.asarray(found[0]["load"][layer]), load)


def test_a_trained_mixture_writes_as_mixtral(tmp_path, caplog):
    """A jaxlm mixture (experts narrower than mlp_dim, with training-only settings) is written as Mixtral: its
    experts' width becomes intermediate_size, the z-loss weight and capacity are left out with a warning, and
    transformers computes the same logits."""
    import dataclasses

    from flax import nnx

    from jaxlm.config import ModelConfig
    from jaxlm.hf import to_hf
    from jaxlm.nn.models import build_model

    cfg = ModelConfig(
        vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=64,
        num_experts=4, expert_mlp_dim=24, router_z_loss_weight=0.001, capacity_factor=1.25, init_std=0.1,
    )  # fmt: skip
    model = build_model(cfg, rngs=nnx.Rngs(0))
    with caplog.at_level("WARNING"):
        to_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert "router_z_loss_weight" in caplog.text and "capacity_factor" in caplog.text
    ref = require("transformers").MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.intermediate_size == 24
    tokens = padded_batch()[0][:2, :16]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tokens)).logits.numpy()
    dropless = build_model(dataclasses.replace(cfg, capacity_factor=0.0), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        jax_logits(dropless, tokens, np.ones_like(tokens, bool), np.arange(16)[None]), want, atol=1e-4
    )
