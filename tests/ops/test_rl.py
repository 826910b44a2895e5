"""RL ops against NumPy loops and hand computations on fixed numbers, and their invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.rl import (
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    value_loss,
    whiten,
)


def _gae_loop(rewards, values, lengths, gamma, lam):
    """TRL PPOTrainer's loop, one row at a time over its real tokens."""
    adv = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    mask = np.arange(rewards.shape[1])[None] < np.asarray(lengths)[:, None]
    return adv, (adv + values) * mask


def test_gae_equals_numpy_loop():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(3, 7)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    lengths = [7, 4, 1]
    mask = np.arange(7)[None] < np.array(lengths)[:, None]
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=0.99, lam=0.95)
    want_adv, want_ret = _gae_loop(rewards * mask, values * mask, lengths, 0.99, 0.95)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


def test_ppo_clipped_objective_by_hand():
    # Token 1: ratio e^0.5 = 1.6487 > 1.2 with A = 2: clipped, loss max(-3.2974, -2.4) = -2.4.
    # Token 2: ratio e^-0.5 = 0.6065 < 0.8 with A = -1: clipped, loss max(0.6065, 0.8) = 0.8.
    # Token 3: ratio 1, A = 3: loss -3. Token 4 is padding.
    logp = jnp.array([[0.5, -0.5, 0.0, 9.0]])
    old = jnp.zeros((1, 4))
    adv = jnp.array([[2.0, -1.0, 3.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, clipped, approx_kl = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    np.testing.assert_allclose(float(loss), -2.4 + 0.8 - 3.0, rtol=1e-6)
    assert float(clipped) == 2
    np.testing.assert_allclose(float(approx_kl), 0.5 * (0.25 + 0.25), rtol=1e-6)
    # Inside the clip range the surrogate's gradient is -A: ratio 1 -> d/dlogp = -A.
    g = jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask, clip=0.2)[0])(jnp.zeros((1, 4)))
    np.testing.assert_allclose(g, [[-2.0, 1.0, -3.0, 0.0]])


def test_value_loss_by_hand():
    v, old, ret = jnp.array([[1.5, 0.0]]), jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 1.0]])
    loss, clipped = value_loss(v, old, ret, jnp.array([[1, 1]]), clip=0.2)
    # Token 1: (1.5-3)^2 = 2.25, clipped V 1.2: (1.2-3)^2 = 3.24 -> 0.5*3.24. Token 2: 0.5*1.
    np.testing.assert_allclose(float(loss), 0.5 * 3.24 + 0.5 * 1.0, rtol=1e-6)
    assert float(clipped) == 1


def test_zero_advantages_and_ratio_one_give_zero_gradient():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    g = jax.grad(lambda lp: ppo_policy_loss(lp, logp, jnp.zeros((1, 3)), jnp.ones((1, 3)), clip=0.2)[0])(logp)
    assert not np.any(np.asarray(g))


def test_kl_estimators():
    logp, ref = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -2.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), [[0.5, 0.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), [[0.125, 0.0]])
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3"), [[np.exp(-0.5) + 0.5 - 1, 0.0]], rtol=1e-6)
    for k in ("k1", "k2", "k3"):  # policy = reference: zero
        assert not np.any(np.asarray(kl_penalty(logp, logp, k)))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_whiten_equals_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(2, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    vals = x[mask]
    want = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(whiten(jnp.asarray(x), jnp.asarray(mask)), want, rtol=1e-5, atol=1e-6)
    kept = whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False)
    np.testing.assert_allclose(kept, (want + vals.mean()) * mask, rtol=1e-5, atol=1e-6)
    assert float(masked_mean(jnp.asarray(x), jnp.asarray(mask))) == pytest.approx(vals.mean(), rel=1e-6)


def test_group_advantages():
    r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(r), 3))
    g = r.reshape(2, 3)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    assert not np.any(adv[3:])  # equal rewards in a group: zero advantage
    np.testing.assert_allclose(group_advantages(jnp.asarray(r), 3, scale=False)[:3], [-1.0, 0.0, 1.0])


def test_grpo_loss_by_hand():
    logp = jnp.array([[0.1, -0.2, 0.0], [0.0, 0.0, 0.0]])
    old = jnp.zeros((2, 3))
    ref = jnp.array([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    loss, kl, clipped = grpo_loss(logp, old, ref, adv, mask, clip=0.1, beta=0.04)
    k3 = lambda lp, r: np.exp(r - lp) - (r - lp) - 1  # noqa: E731
    r1 = np.exp([0.1, -0.2])
    seq1 = np.mean(-np.minimum(r1 * 1.0, np.clip(r1, 0.9, 1.1) * 1.0) + 0.04 * k3(np.array([0.1, -0.2]), 0.0))
    seq2 = np.mean(1.0 + 0.04 * k3(np.zeros(3), np.array([0.3, 0.0, 0.0])))
    np.testing.assert_allclose(float(loss), seq1 + seq2, rtol=1e-5)
    np.testing.assert_allclose(
        float(kl), np.mean(k3(np.array([0.1, -0.2]), 0.0)) + np.mean(k3(np.zeros(3), np.array([0.3, 0, 0]))), rtol=1e-5
    )
    assert float(clipped) == 0.5  # sequence 1: ratio e^0.1 > 1.1 with A > 0 on one of its two tokens
