"""T5 against transformers: logits with padded sources, greedy decoding with the cached encoder K/V,
and round trips; T5 v1.0 (ReLU, scaled tied read-out) and v1.1 (gated GELU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.generate import Generator
from jaxlm.hf import from_hf, to_hf
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
safetensors_numpy = require("safetensors.numpy")

# Equal stack depths: transformers 5.23's T5 generate sizes its cache by num_layers and fails otherwise.
BASE = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
VARIANTS = {
    "t5_v1.0_relu": dict(feed_forward_proj="relu"),
    "t5_v1.1_gated_gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_t5_matches_transformers(variant, tmp_path):
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**BASE, **VARIANTS[variant])).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    model, _, arch = from_hf(tmp_path / "hf")
    assert arch == "T5ForConditionalGeneration"

    rng = np.random.default_rng(0)
    src = rng.integers(2, 100, (3, 12))
    src_valid = np.ones((3, 12), bool)
    src_valid[1, 7:] = False  # padded sources
    src_valid[2, 4:] = False
    tgt = rng.integers(2, 100, (3, 9))
    tgt[:, 0] = 0  # decoder start
    with torch.no_grad():
        want = ref(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_valid.astype(np.int64)),
            decoder_input_ids=torch.tensor(tgt),
        ).logits.numpy()
    got = np.asarray(model(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(src_valid)))
    diff = float(np.abs(got - want).max())
    assert diff < 1e-4, diff

    # Greedy decoding of 32 tokens for a padded batch of sources.
    sources = [src[i, : src_valid[i].sum()].tolist() for i in range(3)]
    ours = Generator(model).generate([[0]] * len(sources), sources=sources, max_new_tokens=32, temperature=0.0)
    for i, s in enumerate(sources):
        with torch.no_grad():
            hf_out = ref.generate(
                torch.tensor([s]),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                decoder_start_token_id=0,
            )
        assert ours[i] == hf_out[0, 1:].tolist(), i
    print(f"\nparity {variant}: max|dlogits| {diff:.2e} greedy-32 match True")

    to_hf(model, tmp_path / "back")
    original = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    written = safetensors_numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for k, v in written.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = reloaded(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_valid.astype(np.int64)),
            decoder_input_ids=torch.tensor(tgt),
        ).logits.numpy()
    np.testing.assert_allclose(again, want, atol=1e-5)


@pytest.mark.parametrize("config", ["t5_tiny", "transformer_tiny"])
def test_jaxlm_encoder_decoders_export(config, tmp_path):
    """jaxlm's own T5 config (untied read-out) exports to transformers; the original Transformer has no HF class."""
    from flax import nnx

    from jaxlm.config import ConfigError, load_config
    from jaxlm.nn.models import build_model

    small = ["model.vocab_size=100", "model.d_model=32", "model.num_layers=1", "model.decoder_layers=2"]
    small += ["model.num_heads=2", "model.head_dim=8", "model.mlp_dim=32"]
    model = build_model(load_config(f"configs/{config}.yaml", small).model, rngs=nnx.Rngs(0))
    if config == "transformer_tiny":
        with pytest.raises(ConfigError, match="cannot be written as T5ForConditionalGeneration: position='sinusoidal'"):
            to_hf(model, tmp_path)
        return
    to_hf(model, tmp_path)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src, tgt = np.arange(10)[None], np.arange(5)[None]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(src), jnp.asarray(tgt))), want, atol=1e-5)
