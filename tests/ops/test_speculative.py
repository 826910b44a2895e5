"""Speculative acceptance keeps the target's distribution (chi-square on fixed seeds), and its greedy case."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.ops.speculative import speculative_accept

CHI2_999 = {4: 18.47, 7: 24.32}  # chi-square quantile 0.999 by degrees of freedom


def chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_emitted_tokens_follow_the_target_distribution():
    V, K, B = 5, 3, 20_000
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(V), size=K + 1).astype(np.float32)  # the target's, per position
    q = rng.dirichlet(np.ones(V) * 0.5, size=K).astype(np.float32)  # a poor draft
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    drafts = jnp.stack(
        [jax.random.categorical(jax.random.fold_in(keys[0], j), jnp.log(q[j]), shape=(B,)) for j in range(K)], 1
    )
    kept, nxt = speculative_accept(
        keys[1], drafts, jnp.broadcast_to(q, (B, K, V)), jnp.broadcast_to(p, (B, K + 1, V)), jnp.full(B, K)
    )
    kept, nxt, drafts = map(np.asarray, (kept, nxt, drafts))
    first = np.where(kept > 0, drafts[:, 0], nxt)
    assert chi2(np.bincount(first, minlength=V), p[0]) < CHI2_999[V - 1]
    second = np.where(kept > 1, drafts[:, 1], nxt)[kept >= 1]  # after a kept first draft
    assert chi2(np.bincount(second, minlength=V), p[1]) < CHI2_999[V - 1]
    # The test has power: the draft's own tokens do not pass as the target's.
    assert chi2(np.bincount(drafts[:, 0], minlength=V), p[0]) > 10 * CHI2_999[V - 1]
    assert 0 < kept.mean() < K


def test_greedy_keeps_the_drafts_the_argmax_agrees_with_and_respects_the_limit():
    V = 6
    target = jnp.array([2, 4, 1, 5])  # argmax after 0..3 drafts
    p = jax.nn.one_hot(target, V)[None]
    drafts = jnp.array([[2, 4, 3]])
    q = jax.nn.one_hot(drafts, V)
    kept, nxt = speculative_accept(jax.random.PRNGKey(0), drafts, q, p, jnp.array([3]))
    assert (int(kept[0]), int(nxt[0])) == (2, 1)  # 2 and 4 kept; the target says 1, not 3
    kept, nxt = speculative_accept(jax.random.PRNGKey(0), drafts, q, p, jnp.array([1]))
    assert (int(kept[0]), int(nxt[0])) == (1, 4)  # only one draft may be kept: the next is the target's own
