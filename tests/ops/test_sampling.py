import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.sampling import sample

probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
logits = jnp.log(jnp.asarray(probs))[None].repeat(4000, 0)
key = jax.random.PRNGKey(0)


def _freq(**kw):
    return np.bincount(np.asarray(sample(key, logits, **kw)), minlength=5) / 4000


def test_greedy_is_argmax():
    lg = jax.random.normal(key, (8, 50))
    np.testing.assert_array_equal(sample(key, lg, temperature=0.0), jnp.argmax(lg, -1))
    np.testing.assert_array_equal(sample(key, lg, top_k=1), jnp.argmax(lg, -1))


def test_temperature_one_follows_the_distribution():
    np.testing.assert_allclose(_freq(), probs, atol=0.03)


def test_low_temperature_sharpens():
    assert _freq(temperature=0.3)[0] > 0.85


def test_top_k_keeps_k_tokens():
    f = _freq(top_k=2)
    assert f[2:].sum() == 0
    np.testing.assert_allclose(f[:2], probs[:2] / probs[:2].sum(), atol=0.03)


def test_top_p_keeps_the_nucleus():
    f = _freq(top_p=0.8)  # 0.5 + 0.2 < 0.8 <= 0.85: tokens 0, 1, 2
    assert f[3:].sum() == 0 and f[2] > 0
    np.testing.assert_allclose(f[:3], probs[:3] / probs[:3].sum(), atol=0.03)


def test_same_key_same_sample_and_bad_args():
    np.testing.assert_array_equal(sample(key, logits), sample(key, logits))
    with pytest.raises(ValueError):
        sample(key, logits, top_p=0.0)


def test_categorical_follows_a_distribution_over_many_blocks():
    """Inverse CDF in two levels: a vocabulary of several blocks, not a multiple of the block, drawn 20,000
    times, matches the probabilities; tokens of probability 0 (the float32 minimum, -inf) never come."""
    from jaxlm.ops.sampling import categorical

    V, n = 1000, 20000
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(V // 10, 0.5))  # mass on every 10th token, spread over the blocks
    logits = np.full(V, np.finfo(np.float32).min, np.float32)
    logits[::10] = np.log(probs)
    logits[5] = -np.inf
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    drawn = np.asarray(categorical(keys, jnp.broadcast_to(jnp.asarray(logits), (n, V)), block=64))
    assert drawn.dtype == np.int32 and (drawn % 10 == 0).all()
    freq = np.bincount(drawn // 10, minlength=V // 10) / n
    assert np.abs(freq - probs).max() < 0.015
    assert 0.5 * np.abs(freq - probs).sum() < 0.06  # total variation


def test_categorical_edges():
    from jaxlm.ops.sampling import categorical

    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    one_hot = jnp.log(jax.nn.one_hot(jnp.arange(64) * 7 % 300, 300))  # a point mass: always that token
    np.testing.assert_array_equal(categorical(keys, one_hot), np.arange(64) * 7 % 300)
    last = jnp.full((64, 300), -jnp.inf).at[:, 299].set(0.0)  # the very last token of a padded block
    np.testing.assert_array_equal(categorical(keys, last), 299)


def test_argmax_takes_the_first_of_ties():
    from jaxlm.ops.sampling import argmax

    lg = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, -1.0, -0.5]])
    np.testing.assert_array_equal(argmax(lg), [1, 0, 3])
    lg = jax.random.normal(key, (16, 5000))
    np.testing.assert_array_equal(argmax(lg), jnp.argmax(lg, -1))
