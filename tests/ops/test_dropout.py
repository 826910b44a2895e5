import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.attention import dot_product_attention
from jaxlm.ops.dropout import dropout, fold_rows, row_keys
from jaxlm.ops.mlp import gated_mlp, mlp


def test_none_keys_or_zero_rate_is_identity():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert dropout(x, 0.5, None) is x
    assert dropout(x, 0.0, row_keys(jax.random.PRNGKey(0), 2)) is x


def test_drop_rate_and_expectation():
    x = jnp.ones((8, 256, 64))
    y = np.asarray(dropout(x, 0.25, row_keys(jax.random.PRNGKey(1), 8)))
    dropped = (y == 0).mean()
    assert abs(dropped - 0.25) < 0.01  # 131k draws: 4 sigma is 0.005
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)  # kept values scaled up
    assert abs(y.mean() - 1.0) < 0.02
    assert dropout(x.astype(jnp.bfloat16), 0.25, row_keys(jax.random.PRNGKey(1), 8)).dtype == jnp.bfloat16


def test_a_rows_mask_depends_only_on_its_key():
    """Micro-batching and sharding split rows: a row's mask must not depend on its neighbours."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 7))
    keys = row_keys(jax.random.PRNGKey(3), 6)
    whole = dropout(x, 0.5, keys)
    np.testing.assert_array_equal(dropout(x[1::2], 0.5, keys[1::2]), whole[1::2])
    np.testing.assert_array_equal(dropout(x[:2], 0.5, keys[:2]), whole[:2])
    # different rows, different masks; different folds, different masks
    assert not np.array_equal(whole[0] == 0, whole[1] == 0)
    assert not np.array_equal(dropout(x, 0.5, fold_rows(keys, 1)) == 0, whole == 0)


def test_bad_arguments_are_named():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="one key per row"):
        dropout(x, 0.1, row_keys(jax.random.PRNGKey(0), 3))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout(x, 1.0, row_keys(jax.random.PRNGKey(0), 2))


def test_attention_weight_dropout_is_unbiased():
    """Averaged over many masks, attention with weight dropout equals attention without it."""
    rows = 512
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jnp.broadcast_to(jax.random.normal(ks[0], (1, 4, 4, 8)), (rows, 4, 4, 8))  # B T N H
    k = jnp.broadcast_to(jax.random.normal(ks[1], (1, 6, 2, 8)), (rows, 6, 2, 8))
    v = jnp.broadcast_to(jax.random.normal(ks[2], (1, 6, 2, 8)), (rows, 6, 2, 8))
    plain = dot_product_attention(q[:1], k[:1], v[:1])[0]
    out = dot_product_attention(q, k, v, dropout_rate=0.3, dropout_keys=row_keys(jax.random.PRNGKey(5), rows))
    assert not np.allclose(out[0], plain, atol=1e-3)  # one draw differs
    np.testing.assert_allclose(out.mean(0), plain, atol=0.1)  # the mean does not (std of the mean ~0.03)
    no_keys = dot_product_attention(q[:1], k[:1], v[:1], dropout_rate=0.3)  # evaluation: no keys, no dropout
    np.testing.assert_allclose(no_keys[0], plain, atol=1e-6)


def test_fused_attention_refuses_dropout():
    q = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="reference implementation"):
        dot_product_attention(
            q, q, q, implementation="xla", dropout_rate=0.1, dropout_keys=row_keys(jax.random.PRNGKey(0), 1)
        )


@pytest.mark.parametrize("gated", [False, True])
def test_mlp_hidden_dropout_is_unbiased_and_inside(gated):
    """T5's feed-forward dropout: on the hidden activations, so the output is a sum over the kept
    units (never zeroed itself), and averaged over many masks it equals the MLP without dropout."""
    rows, D, F = 1024, 4, 16
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jnp.broadcast_to(jax.random.normal(ks[0], (1, 3, D)), (rows, 3, D))
    w_a, w_b = jax.random.normal(ks[1], (D, F)), jax.random.normal(ks[2], (D, F))
    w_out = jax.random.normal(ks[3], (F, D)) / 4

    def run(x, **kw):
        return gated_mlp(x, w_a, w_b, w_out, act="gelu", **kw) if gated else mlp(x, w_a, w_out, act="relu", **kw)

    plain = run(x[:1])[0]
    keys = row_keys(jax.random.PRNGKey(7), rows)
    out = run(x, dropout_rate=0.25, dropout_keys=keys)
    assert not np.allclose(out[0], plain, atol=1e-3)
    assert np.mean(out == 0) < 0.01  # dropout on the output would zero a quarter of it
    np.testing.assert_allclose(out.mean(0), plain, atol=0.1 * float(jnp.abs(plain).max()))
    np.testing.assert_allclose(run(x[:1], dropout_rate=0.25)[0], plain, atol=1e-6)  # no keys, no dropout
