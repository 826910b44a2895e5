"""Mixture-of-experts ops against NumPy: routing, dispatch layouts, the experts' MLP, the router losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.moe import (
    OVERFLOW_BLOCK,
    block_layout,
    block_size,
    capacity_layout,
    expert_mlp,
    load_balancing_loss,
    route,
    router_z_loss,
    split_layout,
    split_sizes,
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1 + np.exp(-x))


def _every_expert(x, weights, experts, wg, wu, wo, keep=None):
    """The dense reference: every expert on every token, weighted by the routing (0 where not chosen)."""
    h = _silu(np.einsum("MD,EDF->MEF", x, wg)) * np.einsum("MD,EDF->MEF", x, wu)
    y = np.einsum("MEF,EFD->MED", h, wo)
    M, k = experts.shape
    out = np.zeros_like(x)
    for m in range(M):
        for j in range(k):
            if keep is None or keep[m, j]:
                out[m] += weights[m, j] * y[m, experts[m, j]]
    return out


def _weights(key, E, D, F):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        np.asarray(jax.random.normal(k1, (E, D, F))) * 0.3,
        np.asarray(jax.random.normal(k2, (E, D, F))) * 0.3,
        np.asarray(jax.random.normal(k3, (E, F, D))) * 0.3,
    )


def test_route_softmax_top_k_renormalised():
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    r = route(jnp.asarray(logits), 2)
    p = _softmax(logits)
    top = np.argsort(-p, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(r.experts), top)
    w = np.take_along_axis(p, top, -1)
    np.testing.assert_allclose(np.asarray(r.weights), w / w.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.probs), p, rtol=1e-6)
    raw = route(jnp.asarray(logits), 2, normalize=False)
    np.testing.assert_allclose(np.asarray(raw.weights), w, rtol=1e-6)


def test_route_sigmoid_with_selection_bias_and_scale():
    """DeepSeek-V3: the bias chooses the experts, the unbiased scores weigh them."""
    logits = np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32)
    bias = np.array([0, 0, 0, 0, 5.0, 5.0], np.float32)  # experts 4 and 5 always win the choice
    r = route(jnp.asarray(logits), 2, score="sigmoid", bias=jnp.asarray(bias), scale=2.5)
    assert set(np.asarray(r.experts).ravel()) == {4, 5}
    s = 1 / (1 + np.exp(-logits))
    w = np.take_along_axis(s, np.asarray(r.experts), -1)
    np.testing.assert_allclose(np.asarray(r.weights), 2.5 * w / w.sum(-1, keepdims=True), rtol=1e-5)


def test_losses_against_hand_numbers():
    # Two tokens, two experts, top-1: token 0 -> expert 0 (p 0.75), token 1 -> expert 0 (p 0.6).
    probs = jnp.array([[0.75, 0.25], [0.6, 0.4]])
    experts = jnp.array([[0], [0]])
    # f = (1, 0), P = (0.675, 0.325): E * sum f P = 2 * 0.675
    assert float(load_balancing_loss(probs, experts)) == pytest.approx(1.35)
    uniform = jnp.full((4, 4), 0.25)
    assert float(load_balancing_loss(uniform, jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]]))) == pytest.approx(2.0)
    logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    assert float(router_z_loss(logits)) == pytest.approx((np.log(2) ** 2 + np.log(4) ** 2) / 2, rel=1e-6)


@pytest.mark.parametrize("impl", ["blocks", "ragged"])
@pytest.mark.parametrize("M,E,k", [(37, 4, 2), (5, 8, 3), (64, 6, 1)])
def test_dropless_equals_every_expert_weighted(impl, M, E, k):
    D, F = 12, 10
    rng = np.random.default_rng(M)
    x = rng.normal(size=(M, D)).astype(np.float32)
    logits = rng.normal(size=(M, E)).astype(np.float32)
    wg, wu, wo = _weights(jax.random.PRNGKey(M), E, D, F)
    r = route(jnp.asarray(logits), k)
    # NumPy weights, as a checkpoint restores them: a traced expert index must still select them
    y, layout = expert_mlp(jnp.asarray(x), r, (wg, wu), wo, impl=impl, block=8)
    want = _every_expert(x, np.asarray(r.weights), np.asarray(r.experts), wg, wu, wo)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(layout.counts), np.bincount(np.asarray(r.experts).ravel(), minlength=E))
    assert int(layout.dropped) == 0


@pytest.mark.parametrize("impl", ["blocks", "ragged"])
def test_gradients_equal_the_dense_computation(impl):
    M, E, k, D, F = 29, 5, 2, 8, 6
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(M, D)).astype(np.float32))
    router = jnp.asarray(rng.normal(size=(D, E)).astype(np.float32))
    ws = tuple(jnp.asarray(w) for w in _weights(jax.random.PRNGKey(1), E, D, F))

    def loss(x, router, wg, wu, wo, dense):
        r = route(x @ router, k)
        if dense:  # every expert, weighted by a (M, E) matrix of the routing weights
            h = jax.nn.silu(jnp.einsum("MD,EDF->MEF", x, wg)) * jnp.einsum("MD,EDF->MEF", x, wu)
            gates = jnp.zeros((M, E)).at[jnp.arange(M)[:, None], r.experts].set(r.weights)
            y = jnp.einsum("MEF,EFD,ME->MD", h, wo, gates)
        else:
            y, _ = expert_mlp(x, r, (wg, wu), wo, impl=impl, block=8)
        return jnp.sum(jnp.sin(y))

    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, router, *ws, False)
    want = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, router, *ws, True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_capacity_dispatch_drops_past_capacity_and_counts():
    M, E, k, D, F = 16, 4, 1, 6, 5
    experts = np.zeros((M, k), np.int32)  # every token to expert 0
    experts[::4] = 1  # 4 tokens to expert 1
    weights = np.ones((M, k), np.float32)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M, D)).astype(np.float32)
    wg, wu, wo = _weights(jax.random.PRNGKey(0), E, D, F)
    from jaxlm.ops.moe import Routing

    r = Routing(jnp.asarray(weights), jnp.asarray(experts), jnp.zeros((M, E)), jnp.zeros((M, E)))
    # capacity = ceil(1.0 * 16 * 1 / 4) = 4: expert 0 keeps its first 4 tokens (in token order), drops 8
    y, layout = expert_mlp(jnp.asarray(x), r, (jnp.asarray(wg), jnp.asarray(wu)), jnp.asarray(wo), capacity_factor=1.0)
    assert int(layout.dropped) == 8
    np.testing.assert_array_equal(np.asarray(layout.counts), [12, 4, 0, 0])
    to0 = np.flatnonzero(experts[:, 0] == 0)
    keep = np.ones((M, k), bool)
    keep[to0[4:]] = False
    np.testing.assert_allclose(
        np.asarray(y), _every_expert(x, weights, experts, wg, wu, wo, keep), rtol=1e-5, atol=1e-6
    )
    assert not np.asarray(y)[to0[4:]].any()


def test_block_layout_rows_are_grouped_and_whole_blocks():
    experts = jnp.asarray(np.random.default_rng(5).integers(0, 3, size=(21, 2)), jnp.int32)
    lay = block_layout(experts, 3, 4)
    A = experts.size
    assign, slot, be = np.asarray(lay.assign), np.asarray(lay.slot), np.asarray(lay.block_expert)
    flat = np.asarray(experts).ravel()
    for a in range(A):  # each assignment sits in a block of its expert, and the row points back to it
        assert assign[slot[a]] == a
        assert be[slot[a] // 4] == flat[a]
    assert (assign < A).sum() == A
    assert block_size(4, 64) == 8 and block_size(100_000, 8) == 128 and block_size(48, 4) == 16


def test_capacity_layout_rows():
    lay = capacity_layout(jnp.array([[0], [0], [0], [1]], jnp.int32), 2, 2)
    assert np.asarray(lay.slot).tolist() == [0, 1, 4, 2]  # the third token to expert 0 is dropped (row R = 4)
    assert int(lay.dropped) == 1


def _skewed_logits(rng, M, E, skew):
    """Router logits; skew: every token's first two choices are experts 0 and 1 (an overflow past
    split_layout's room)."""
    logits = rng.normal(size=(M, E)).astype(np.float32)
    return logits + (np.eye(E, dtype=np.float32)[:2].sum(0) * 20.0 if skew else 0.0)


@pytest.mark.parametrize("skew", [False, True], ids=["split", "fallback"])
def test_split_layout_rows(skew):
    """An expert's first C assignments sit in its own C rows, the rest in whole overflow blocks of its expert; a
    routing whose overflow does not fit takes the fallback (every expert in blocks of OVERFLOW_BLOCK rows)."""
    M, E, k = 512, 4, 2
    experts = route(jnp.asarray(_skewed_logits(np.random.default_rng(0), M, E, skew)), k).experts
    C, nb = split_sizes(M * k, E, block=8)
    assert C == 256 and C % OVERFLOW_BLOCK == 0
    layout, packing = split_layout(experts, E, C, nb)
    assert bool(packing.fits) == (not skew)
    assign, slot = np.asarray(layout.assign), np.asarray(layout.slot)
    flat = np.asarray(experts).ravel()
    rank = {e: 0 for e in range(E)}
    for a in np.argsort(flat, kind="stable"):  # each assignment's row, and the row points back to it
        e, row = flat[a], slot[a]
        assert assign[row] == a
        if skew:
            expert_of_row = np.asarray(packing.all_expert)[row // OVERFLOW_BLOCK]
        elif rank[e] < C:
            expert_of_row = row // C
            assert row == e * C + rank[e]
        else:
            expert_of_row = np.asarray(packing.over_expert)[(row - E * C) // OVERFLOW_BLOCK]
        assert expert_of_row == e
        rank[e] += 1
    assert (assign < M * k).sum() == M * k and int(layout.dropped) == 0
    assert split_sizes(64, 8, block=128) is None  # 8 rows an expert: the block layout


@pytest.mark.parametrize("skew", [False, True], ids=["split", "fallback"])
def test_split_gradients_with_biases_and_loras_equal_the_dense_computation(skew):
    """Many rows an expert (`split_layout`, and its fallback): outputs and gradients of a gated expert MLP with
    biases and per-expert LoRAs equal every expert computed on every token, weighted."""
    M, E, k, D, F, R = 256, 4, 2, 8, 6, 2
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(M, D)).astype(np.float32))
    logits = jnp.asarray(_skewed_logits(rng, M, E, skew))
    C, nb = split_sizes(M * k, E, block=8)
    assert bool(split_layout(route(logits, k).experts, E, C, nb)[1].fits) == (not skew)
    ws = tuple(jnp.asarray(w) for w in _weights(jax.random.PRNGKey(2), E, D, F))
    bs = tuple(jnp.asarray(rng.normal(size=s).astype(np.float32)) * 0.3 for s in ((E, F), (E, F), (E, D)))
    ab = lambda i, o: tuple(jnp.asarray(rng.normal(size=s).astype(np.float32)) * 0.3 for s in ((E, i, R), (E, R, o)))  # noqa: E731
    pairs = (ab(D, F), ab(D, F), ab(F, D))

    def loss(x, wg, wu, wo, bs, pairs, dense):
        r = route(logits, k)
        lora = lambda p: (p[0], p[1], 0.5)  # noqa: E731
        if dense:  # every expert, weighted by a (M, E) matrix of the routing weights
            up = lambda w, b, p: jnp.einsum("MD,EDF->MEF", x, w + 0.5 * p[0] @ p[1]) + b  # noqa: E731
            h = jax.nn.silu(up(wg, bs[0], pairs[0])) * up(wu, bs[1], pairs[1])
            y = jnp.einsum("MEF,EFD->MED", h, wo + 0.5 * pairs[2][0] @ pairs[2][1]) + bs[2]
            gates = jnp.zeros((M, E)).at[jnp.arange(M)[:, None], r.experts].set(r.weights)
            y = jnp.einsum("MED,ME->MD", y, gates)
        else:
            loras = ((lora(pairs[0]), lora(pairs[1])), lora(pairs[2]))
            y, _ = expert_mlp(x, r, (wg, wu), wo, b_in=bs[:2], b_out=bs[2], loras=loras, block=8)
        return jnp.sum(jnp.sin(y))

    args = (x, *ws, bs, pairs)
    np.testing.assert_allclose(loss(*args, False), loss(*args, True), rtol=1e-5)
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*args, False)
    want = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(*args, True)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
