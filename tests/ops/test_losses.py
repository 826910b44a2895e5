import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.losses import cross_entropy, masked_positions, masked_readout_sum, masked_sum, token_nll

rng = np.random.default_rng(0)
logits = rng.normal(size=(2, 4, 10)).astype(np.float32) * 3
targets = rng.integers(0, 10, (2, 4))


def _nll():
    logz = np.log(np.exp(logits).sum(-1))
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0], logz


def test_cross_entropy_sum_and_count():
    nll, _ = _nll()
    s, c = cross_entropy(logits, targets)
    np.testing.assert_allclose(s, nll.sum(), rtol=1e-5)
    assert c == 8


def test_masked_tokens_do_not_count():
    nll, _ = _nll()
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], bool)
    s, c = cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(s, nll[mask].sum(), rtol=1e-5)
    assert c == 4


def test_z_loss():
    nll, logz = _nll()
    s, _ = cross_entropy(logits, targets, z_loss=1e-2)
    np.testing.assert_allclose(s, (nll + 1e-2 * logz**2).sum(), rtol=1e-5)


def test_masked_positions():
    mask = jnp.array([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]])
    idx, valid = masked_positions(mask, 3)
    assert np.asarray(idx).tolist() == [[1, 3, 4], [0, 0, 0], [0, 5, 0]]
    assert np.asarray(valid).tolist() == [[True] * 3, [False] * 3, [True, True, False]]


@pytest.mark.parametrize("case", ["sparse", "a full row", "weights", "no mask"])
def test_masked_readout_sum_equals_reading_out_every_position(case):
    """Reading out only the masked positions (rows with at most T/4 of them), or every position (a fuller row),
    gives the loss and gradients of reading out all of them."""
    B, T, D, V = 3, 16, 8, 11
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)))
    mask = np.zeros((B, T), np.float32)
    mask[0, [2, 5, 9]] = 1
    mask[2, [15]] = 1
    if case == "a full row":
        mask[1, :10] = 1
    if case == "weights":
        mask[0, 5] = 0.25
    mask = None if case == "no mask" else jnp.asarray(mask)
    calls = []

    def loss(x, w, gathered):
        def readout(x, targets):
            calls.append(x.shape[1])
            return token_nll(x @ w, targets)

        s, n = masked_readout_sum(readout, x, targets, mask) if gathered else masked_sum(readout(x, targets), mask)
        return s / n

    got = jax.value_and_grad(loss, argnums=(0, 1))(x, w, True)
    assert (4 in calls) == (case != "no mask")  # T/4 gathered positions a row were read out
    want = jax.value_and_grad(loss, argnums=(0, 1))(x, w, False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
