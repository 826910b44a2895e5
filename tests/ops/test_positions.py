import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.positions import apply_rope, rope_frequencies, sinusoidal_positions


def test_rope_score_depends_only_on_relative_position():
    H = 16
    inv = rope_frequencies(H, 10000.0)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, H))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, H))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), inv)
        kn = apply_rope(k, jnp.array([[n]]), inv)
        return float(jnp.sum(qm * kn))

    for d in (0, 3, 17):
        scores = [score(m + d, m) for m in (0, 5, 100, 1000)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(3, 0) - score(0, 3)) > 1e-3  # direction matters


def test_rope_matches_rotate_half_formula():
    H = 8
    x = np.random.default_rng(0).normal(size=(2, 3, 2, H)).astype(np.float32)
    pos = np.array([[0, 1, 7], [2, 3, 40]])
    inv = 1.0 / 10000.0 ** (np.arange(0, H, 2) / H)
    ang = pos[..., None] * inv
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None]
    rot = np.concatenate([-x[..., H // 2 :], x[..., : H // 2]], -1)
    np.testing.assert_allclose(apply_rope(x, pos, rope_frequencies(H)), x * cos + rot * sin, atol=1e-5)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7)


def test_sinusoidal_matches_formula():
    pos = np.arange(5)[None]
    out = np.asarray(sinusoidal_positions(pos, 6))
    w = 1.0 / 10000 ** (np.arange(0, 6, 2) / 6)
    np.testing.assert_allclose(out[0, :, :3], np.sin(np.arange(5)[:, None] * w), atol=1e-6)
    np.testing.assert_allclose(out[0, :, 3:], np.cos(np.arange(5)[:, None] * w), atol=1e-6)


# --- length scaling, ALiBi and T5 buckets -----------------------------------------------------------

from jaxlm.ops.positions import (  # noqa: E402
    alibi_bias,
    alibi_slopes,
    scaled_rope_frequencies,
    t5_bias,
    t5_position_buckets,
)
from tests.parity import require  # noqa: E402

SCALINGS = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_rope_scaling_matches_transformers_beyond_the_original_context(scaling):
    torch = require("torch")
    transformers = require("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    H, theta, orig = 32, 10000.0, 64
    params = {"rope_type": scaling, "rope_theta": theta, **SCALINGS[scaling]}
    max_pos = orig if scaling == "dynamic" else 4 * orig  # dynamic: HF's max_position_embeddings is the original
    config = transformers.LlamaConfig(
        hidden_size=4 * H, num_attention_heads=4, head_dim=H, max_position_embeddings=max_pos, rope_parameters=params
    )
    rotary = LlamaRotaryEmbedding(config)
    T = 200  # beyond the original 64 positions
    positions = torch.arange(T)[None]
    q = torch.randn(1, 4, T, H)
    cos, sin = rotary(q, positions)
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)

    inv, scale = scaled_rope_frequencies(
        H,
        theta,
        scaling,
        factor=params["factor"],
        original_max_len=params.get("original_max_position_embeddings", orig),
        seq_len=T,
        low_freq_factor=params.get("low_freq_factor", 1.0),
        high_freq_factor=params.get("high_freq_factor", 4.0),
    )
    # Frequencies to float32 rounding; rotated vectors to the rounding of float32 angles up to ~200 rad.
    np.testing.assert_allclose(inv, rotary.inv_freq.numpy(), rtol=1e-6)
    assert scale == pytest.approx(rotary.attention_scaling)
    got = apply_rope(jnp.asarray(q.numpy()).transpose(0, 2, 1, 3), jnp.arange(T)[None], inv, scale)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), want.numpy(), atol=1e-4)


def test_rope_scaling_none_is_plain_rope_and_unknown_is_an_error():
    inv, scale = scaled_rope_frequencies(16, 500.0)
    np.testing.assert_array_equal(inv, rope_frequencies(16, 500.0))
    assert scale == 1.0
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk'"):
        scaled_rope_frequencies(16, 500.0, "ntk")


@pytest.mark.parametrize("n", [1, 4, 8, 12, 16])
def test_alibi_slopes_match_the_paper(n):
    # Reference: Press et al.'s get_slopes (github.com/ofirpress/attention_with_linear_biases).
    def get_slopes(n):
        def power_of_2(n):
            start = 2 ** (-(2 ** -(np.log2(n) - 3)))
            return [start * start**i for i in range(n)]

        if np.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** int(np.floor(np.log2(n)))
        return power_of_2(closest) + get_slopes(2 * closest)[0::2][: n - closest]

    np.testing.assert_allclose(alibi_slopes(n), get_slopes(n), rtol=1e-6)


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(4)
    q = jnp.array([[5, 6]])
    k = jnp.arange(7)[None]
    bias = alibi_bias(slopes, q, k)
    assert bias.shape == (1, 4, 2, 7)
    np.testing.assert_allclose(bias[0, 2, 1], -slopes[2] * np.abs(6 - np.arange(7)), rtol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_transformers(bidirectional):
    torch = require("torch")
    require("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)
    want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    got = t5_position_buckets(jnp.asarray(rel.numpy()), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_t5_bias_gathers_the_table_per_head():
    table = jnp.arange(32 * 3, dtype=jnp.float32).reshape(32, 3)
    pos = jnp.arange(6)[None]
    bias = t5_bias(table, pos, pos, bidirectional=True, max_distance=128)
    assert bias.shape == (1, 3, 6, 6)
    # Equal relative positions share a value; the diagonal is bucket 0.
    np.testing.assert_array_equal(np.diagonal(bias[0, 1]), table[0, 1])
    assert float(bias[0, 2, 0, 3]) == float(bias[0, 2, 1, 4])
