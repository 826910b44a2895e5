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
