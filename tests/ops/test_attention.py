import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.attention import attention_mask, dot_product_attention


def _qkv(B=2, T=5, S=5, N=4, K=2, H=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], (B, T, N, H)),
        jax.random.normal(ks[1], (B, S, K, H)),
        jax.random.normal(ks[2], (B, S, K, H)),
    )


def numpy_mha(q, k, v, mask=None, bias=None, cap=0.0):
    """Per-head loop, K/V repeated to N heads: the textbook definition."""
    q, k, v = map(np.asarray, (q, k, v))
    B, T, N, H = q.shape
    k = np.repeat(k, N // k.shape[2], axis=2)
    v = np.repeat(v, N // v.shape[2], axis=2)
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = q[b, :, n] @ k[b, :, n].T / np.sqrt(H)
            if cap:
                s = cap * np.tanh(s / cap)
            if bias is not None:
                s = s + np.asarray(bias)[b, n]
            if mask is not None:
                s = np.where(np.asarray(mask)[b], s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, n] = p @ v[b, :, n]
    return out


@pytest.mark.parametrize("K", [4, 2, 1])  # MHA, GQA, MQA
def test_matches_textbook_attention(K):
    q, k, v = _qkv(K=K)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = attention_mask(pos, pos)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask=mask), numpy_mha(q, k, v, mask), atol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha_on_repeated_kv():
    q, k, v = _qkv(K=2)
    rep = lambda x: jnp.repeat(x, 2, axis=2)  # noqa: E731
    np.testing.assert_allclose(dot_product_attention(q, k, v), dot_product_attention(q, rep(k), rep(v)), atol=1e-6)


@pytest.mark.parametrize("K", [4, 2, 1])
def test_reference_and_jax_paths_agree(K):
    q, k, v = _qkv(B=2, T=7, S=7, N=4, K=K)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    valid = jnp.array([[True] * 7, [False, False] + [True] * 5])
    mask = attention_mask(pos, pos, kv_valid=valid, sliding_window=4)
    bias = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 7, 7))
    ref = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="reference")
    xla = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla")
    np.testing.assert_allclose(ref, xla, atol=1e-5)


def test_padding_masked_keys_get_zero_weight():
    q, k, v = _qkv()
    valid = jnp.array([[True, True, True, False, False]] * 2)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = attention_mask(pos, pos, kv_valid=valid, causal=False)
    out = dot_product_attention(q, k, v, mask=mask)
    # Any value in the masked keys leaves the output unchanged.
    out2 = dot_product_attention(q, k.at[:, 3:].set(1e3), v.at[:, 3:].set(-1e3), mask=mask)
    np.testing.assert_allclose(out, out2, atol=1e-6)


def test_causal_and_sliding_window_mask():
    pos = jnp.arange(6)[None]
    m = np.asarray(attention_mask(pos, pos, sliding_window=3))[0]
    for t in range(6):
        for s in range(6):
            assert m[t, s] == (t - 3 < s <= t)


def test_bidirectional_sliding_window_is_symmetric():
    pos = jnp.arange(6)[None]
    m = np.asarray(attention_mask(pos, pos, causal=False, sliding_window=2))[0]
    for t in range(6):
        for s in range(6):
            assert m[t, s] == (abs(t - s) < 2)


def test_fully_masked_rows_are_the_mean_of_v():
    """As the docstring promises: rows with no visible key return mean(v) over the keys, not NaN."""
    q, k, v = _qkv()
    mask = np.ones((2, 5, 5), bool)
    mask[1, 2] = False  # query 2 of row 1 sees nothing
    out = np.asarray(dot_product_attention(q, k, v, mask=jnp.asarray(mask)))
    G = q.shape[2] // k.shape[2]
    want = np.repeat(np.asarray(v[1]).mean(axis=0), G, axis=0)  # (N, H): query head n reads kv head n // G
    np.testing.assert_allclose(out[1, 2], want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all()


def test_softcap_bounds_scores():
    q, k, v = _qkv()
    big = q * 100.0
    capped = dot_product_attention(big, k, v, softcap=1.0)
    manual = numpy_mha(big, k, v, cap=1.0)
    np.testing.assert_allclose(np.asarray(capped), manual, rtol=1e-4, atol=1e-5)


def test_bad_head_counts_and_implementation():
    q, k, v = _qkv(N=4, K=3)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        dot_product_attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash9")
