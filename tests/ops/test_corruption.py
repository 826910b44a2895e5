import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops.corruption import mlm_corrupt


def test_mlm_corruption_follows_80_10_10():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (64, 512), 0, 1000)
    valid = jnp.arange(512)[None] < 400
    out, picked = mlm_corrupt(jax.random.PRNGKey(1), tokens, mask_id=1000, vocab_size=1001, rate=0.15, valid=valid)
    out, picked, tokens, valid = map(np.asarray, (out, picked, tokens, valid))
    assert not picked[:, 400:].any()  # padding is never a target
    assert abs(picked[:, :400].mean() - 0.15) < 0.01
    n = picked.sum()
    masked = (out == 1000) & picked
    kept = (out == tokens) & picked
    replaced = picked & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02  # the 10% kept, plus random draws that hit the original (0.01%)
    assert abs(replaced.sum() / n - 0.1) < 0.02
    np.testing.assert_array_equal(out[~picked], tokens[~picked])


def test_mlm_corruption_is_a_function_of_the_key():
    tokens = jnp.arange(100)[None] % 50
    a = mlm_corrupt(jax.random.PRNGKey(3), tokens, mask_id=50, vocab_size=51)
    b = mlm_corrupt(jax.random.PRNGKey(3), tokens, mask_id=50, vocab_size=51)
    c = mlm_corrupt(jax.random.PRNGKey(4), tokens, mask_id=50, vocab_size=51)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
