import numpy as np

from jaxlm.ops.losses import cross_entropy

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
