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


def _xla_token_logprobs(logits, tokens, k):
    """The reference: log-softmax, the chosen entries, lax.top_k (an earlier index first among equals)."""
    lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(lsm, k)
    return jnp.take_along_axis(lsm, jnp.clip(tokens, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0], top_ids, top_lp


@pytest.mark.parametrize("shape,k", [((3, 5, 1000), 20), ((7, 49), 5), ((2, 13), 13), ((4, 16), 1), ((1, 33), 20)])
def test_token_logprobs_equal_the_log_softmax(shape, k):
    """The CPU kernel (or XLA elsewhere): ties, -inf (masked) logits, tokens out of range (clipped), rows
    shorter than a vector and vocabularies that are not a multiple of 16."""
    from jaxlm.ops.sampling import token_logprobs

    rng = np.random.default_rng(sum(shape) + k)
    logits = rng.standard_normal(shape).astype(np.float32) * 4
    logits[..., 3] = logits[..., 7] = logits.max() + 1  # a tie at the top: token 3 is listed first
    logits[..., 1] = -np.inf
    tokens = rng.integers(-2, shape[-1] + 2, shape[:-1]).astype(np.int32)
    tokens.reshape(-1)[0] = 1  # a masked token: log p = -inf
    got = jax.jit(token_logprobs, static_argnums=2)(jnp.asarray(logits), jnp.asarray(tokens), k)
    want = _xla_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), k)
    assert [g.shape for g in got] == [shape[:-1], (*shape[:-1], k), (*shape[:-1], k)]
    np.testing.assert_array_equal(got[1], want[1])
    assert got[1][(0,) * (len(shape) - 1)][:2].tolist() == [3, 7][:k]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    top = np.asarray(got[2])  # a chosen token's value is its top entry's, bit for bit
    chosen = jax.jit(token_logprobs, static_argnums=2)(jnp.asarray(logits), got[1][..., 0], k)[0]
    np.testing.assert_array_equal(chosen, top[..., 0])


def test_token_logprobs_refuses_more_alternatives_than_tokens():
    from jaxlm.ops.sampling import token_logprobs

    with pytest.raises(ValueError, match="k=6 alternatives of a vocabulary of 5"):
        token_logprobs(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32), 6)


def test_token_logprobs_lower_to_the_cpu_kernel():
    from jaxlm import kernels
    from jaxlm.ops.sampling import token_logprobs

    if not kernels.available():
        pytest.skip("kernels turned off, or no C++ compiler: the XLA path stands in")
    traced = jax.jit(token_logprobs, static_argnums=2).trace(jnp.zeros((4, 100)), jnp.zeros(4, jnp.int32), 5)
    assert "jaxlm_token_logprobs" in traced.lower(lowering_platforms=("cpu",)).as_text()
