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
