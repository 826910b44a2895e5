import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.dense import dense


@pytest.mark.parametrize(
    "x_shape, w_shape, n",
    [((2, 5, 8), (8, 12), 1), ((2, 5, 12), (12, 8), 1), ((2, 5, 4, 3), (4, 3, 6), 2), ((3, 8), (8, 2, 5), 1)],
)
def test_dense_value_and_gradients_match_tensordot(x_shape, w_shape, n):
    """Both weight-gradient layouts (narrower input or narrower output) equal autodiff of tensordot."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    dy = jax.random.normal(kg, jnp.tensordot(x, w, n).shape)
    f = lambda fn: lambda x, w: jnp.sum(fn(x, w) * dy)  # noqa: E731
    np.testing.assert_allclose(dense(x, w, n), jnp.tensordot(x, w, n), rtol=1e-6)
    got = jax.grad(f(lambda x, w: dense(x, w, n)), argnums=(0, 1))(x, w)
    want = jax.grad(f(lambda x, w: jnp.tensordot(x, w, n)), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
