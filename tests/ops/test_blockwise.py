"""Blockwise attention equals the reference, forward and gradients, for every mask and bias kind; it skips the
tiles no query may attend; it refuses what it cannot take."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.attention import MaskSpec, PositionBias, dot_product_attention
from jaxlm.ops.blockwise import _live, blockwise_attention, padded_spec
from jaxlm.ops.positions import alibi_bias, alibi_slopes, t5_bias

B, T, N, K, H = 2, 37, 4, 2, 8
rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
v = jnp.asarray(rng.normal(size=(B, T, K, 6)), jnp.float32)  # value width apart from H (latent attention)
pos = jnp.broadcast_to(jnp.arange(T), (B, T))
valid = jnp.arange(T)[None] < jnp.array([[T], [30]])  # row 1: 7 padding tokens
seg = jnp.asarray((np.arange(T)[None] >= np.array([[10], [20]])).astype(np.int32))
packed = jnp.where(seg == 1, pos - jnp.array([[10], [20]]), pos)  # positions restart in each packed example
table = jnp.asarray(rng.normal(size=(32, N)), jnp.float32)
sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
t5 = functools.partial(t5_bias, bidirectional=True, max_distance=64)

CASES = {
    "causal": dict(mask=MaskSpec(pos, pos, valid)),
    "bidirectional": dict(mask=MaskSpec(pos, pos, valid, causal=False)),
    "sliding window": dict(mask=MaskSpec(pos, pos, valid, window=jnp.int32(5))),
    "bidirectional window": dict(mask=MaskSpec(pos, pos, valid, window=jnp.int32(5), causal=False)),
    "segments": dict(mask=MaskSpec(packed, packed, valid, q_segments=seg, kv_segments=seg)),
    "prefix LM": dict(mask=MaskSpec(pos, pos, valid, q_prefix=pos < 7, kv_prefix=pos < 7)),
    "alibi": dict(mask=MaskSpec(pos, pos, valid), bias=PositionBias(alibi_slopes(N), alibi_bias)),
    "t5": dict(mask=MaskSpec(pos, pos, valid, causal=False), bias=PositionBias(table, t5)),
    "softcap": dict(mask=MaskSpec(pos, pos, valid), softcap=3.0),
    "sinks": dict(mask=MaskSpec(pos, pos, valid), sinks=sinks),
    "everything": dict(
        mask=MaskSpec(packed, packed, valid, q_segments=seg, kv_segments=seg, window=jnp.int32(6)),
        bias=PositionBias(table, t5),
        softcap=4.0,
        sinks=sinks,
    ),
}


def _loss(impl, case, block, q, k, v, params, sinks):
    bias = case.get("bias")
    bias = None if bias is None else PositionBias(params, bias.fn)
    out = dot_product_attention(
        q,
        k,
        v,
        mask=case["mask"],
        bias=bias,
        softcap=case.get("softcap", 0.0),
        sinks=sinks if "sinks" in case else None,
        implementation=impl,
        block_size=block,
    )
    weights = jnp.sin(jnp.arange(out.size).reshape(out.shape))  # every output element its own cotangent
    return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) * weights)  # padding queries do not count


# Tiles of 8 (5 x 5, padded, most skipped) for every case; one tile larger than the sequence, and 16, for all at once.
@pytest.mark.parametrize(
    "name, block", [(name, 8) for name in CASES] + [("everything", 16), ("everything", 64)], ids=str
)
def test_equals_the_reference_forward_and_gradients(name, block):
    case = CASES[name]
    params = case["bias"].params if "bias" in case else table
    args = (q, k, v, params, sinks)
    grad = lambda impl: jax.jit(jax.value_and_grad(functools.partial(_loss, impl, case, block), argnums=range(5)))  # noqa: E731
    (ref, ref_grads), (got, got_grads) = grad("reference")(*args), grad("blockwise")(*args)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r)) + 1))


def test_queries_over_a_longer_cache_with_empty_slots():
    """Prefill of 12 queries at positions 20.. over 64 slots, 20 filled before them and the rest empty."""
    S, Tq = 64, 12
    kv_pos = jnp.broadcast_to(jnp.where(jnp.arange(S) < 20 + Tq, jnp.arange(S), -1), (B, S))
    kv_valid = kv_pos >= 0
    q_pos = jnp.broadcast_to(20 + jnp.arange(Tq), (B, Tq))
    mask = MaskSpec(q_pos, kv_pos, kv_valid)
    kc = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    ref = dot_product_attention(q[:, :Tq], kc, vc, mask=mask)
    got = dot_product_attention(q[:, :Tq], kc, vc, mask=mask, implementation="blockwise", block_size=16)
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_skips_the_tiles_no_query_sees():
    spec = padded_spec(MaskSpec(pos, pos, valid), B, T, T, 40, 40)
    np.testing.assert_array_equal(_live(spec, 5, 5), np.tril(np.ones((5, 5), bool)))  # causal: the lower half
    window = padded_spec(MaskSpec(pos, pos, valid, window=jnp.int32(5)), B, T, T, 40, 40)
    np.testing.assert_array_equal(
        _live(window, 5, 5), np.tril(np.ones((5, 5), bool)) & np.triu(np.ones((5, 5), bool), -1)
    )
    one_row = valid[:1] & (jnp.arange(T)[None] < 16)  # keys past 16 are padding
    spec = padded_spec(MaskSpec(pos[:1], pos[:1], one_row, causal=False), 1, T, T, 40, 40)
    np.testing.assert_array_equal(_live(spec, 5, 5), np.broadcast_to([True, True, False, False, False], (5, 5)))
    examples = jnp.asarray((np.arange(T)[None] >= 16).astype(np.int32))  # two packed examples, split at 16
    spec = padded_spec(
        MaskSpec(pos[:1], pos[:1], causal=False, q_segments=examples, kv_segments=examples), 1, T, T, 40, 40
    )
    live = np.asarray(_live(spec, 5, 5))  # blocks 0-1 are the first example, 2-4 the second
    np.testing.assert_array_equal(live, np.kron(np.eye(2, dtype=bool), np.ones((3, 3), bool))[1:, 1:])


def test_rows_without_a_visible_key_return_zero():
    nothing = MaskSpec(pos, pos, jnp.zeros((B, T), bool))
    out = blockwise_attention(q, k, v, mask=nothing, block_q=8, block_k=8)
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.grad(lambda q: jnp.sum(blockwise_attention(q, k, v, mask=nothing, block_q=8, block_k=8)))(q)
    assert np.isfinite(grads).all()


def test_bfloat16_close_to_the_float32_reference():
    spec = MaskSpec(pos, pos, valid)
    ref = dot_product_attention(q, k, v, mask=spec)
    got = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), mask=spec, implementation="blockwise")
    assert got.dtype == jnp.bfloat16
    rows = valid[:, :, None, None]
    assert float(jnp.max(jnp.abs(jnp.where(rows, got.astype(jnp.float32) - ref, 0)))) < 0.05


def test_decoding_steps_take_the_reference_path():
    spec = MaskSpec(pos[:, -1:], pos, valid)
    ref = dot_product_attention(q[:, -1:], k, v, mask=spec)
    np.testing.assert_array_equal(dot_product_attention(q[:, -1:], k, v, mask=spec, implementation="blockwise"), ref)


def test_refuses_a_materialised_mask_or_bias_and_dropout():
    with pytest.raises(ValueError, match="MaskSpec"):
        dot_product_attention(q, k, v, mask=jnp.ones((B, T, T), bool), implementation="blockwise")
    with pytest.raises(ValueError, match="PositionBias"):
        dot_product_attention(
            q, k, v, mask=MaskSpec(pos, pos), bias=jnp.zeros((1, N, T, T)), implementation="blockwise"
        )
    keys = jnp.zeros((B, 2), jnp.uint32)
    with pytest.raises(ValueError, match="dropout"):
        dot_product_attention(
            q, k, v, mask=MaskSpec(pos, pos), implementation="blockwise", dropout_rate=0.1, dropout_keys=keys
        )
    with pytest.raises(ValueError, match="blocks must be positive"):
        blockwise_attention(q, k, v, mask=MaskSpec(pos, pos), block_q=0)
