"""Decode-time attention read in place from the paged KV pool: the native CPU kernel against the gather +
reference attention it replaces (and which GPUs and kernel-less machines run)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kernels
from jaxlm.ops.attention import dot_product_attention
from jaxlm.ops.cache import paged_read
from jaxlm.ops.paged_attention import paged_attention

NO_BLOCK = 2**30


def case(seed, *, B=3, T=1, K=2, G=3, H=16, Hv=16, L=3, NB=11, Z=4, nb=4):
    """Pools of L layers, tables with shuffled blocks and missing ones (NO_BLOCK, -1), a mask that leaves every
    query at least one slot and none of a missing block (the engine's: those slots read position -1)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, K * G, H), np.float32)
    k_pool = rng.standard_normal((L, NB, Z, K, H), np.float32)
    v_pool = rng.standard_normal((L, NB, Z, K, Hv), np.float32)
    table = np.stack([rng.permutation(NB)[:nb] for _ in range(B)]).astype(np.int32)
    table[0, -1], table[1, -2:] = NO_BLOCK, -1
    mask = rng.random((B, T, nb * Z)) < 0.6
    mask[:, :, 0] = True  # slot 0 of each row's first block (a real one)
    mask &= np.repeat((table >= 0) & (table < NB), Z, axis=1)[:, None]
    return tuple(map(jnp.asarray, (q, k_pool, v_pool, table, mask)))


def reference(q, k_pool, v_pool, table, mask, layer, scale=None, softcap=0.0):
    k, v = (paged_read(p, table, layer) for p in (k_pool, v_pool))
    return dot_product_attention(q, k, v, mask=mask, scale=scale, softcap=softcap)


@pytest.mark.parametrize("T,G,softcap", [(1, 3, 0.0), (1, 1, 0.0), (3, 2, 0.0), (1, 3, 2.0), (5, 1, 3.0)])
def test_kernel_equals_gather_then_attend(T, G, softcap):
    q, kp, vp, table, mask = case(T + 10 * G, T=T, G=G)
    scale = 0.3
    f = jax.jit(lambda q, layer: paged_attention(q, kp, vp, table, mask, layer, scale=scale, softcap=softcap))
    for layer in range(kp.shape[0]):  # a traced layer index, as a layer scan passes it
        want = reference(q, kp, vp, table, mask, layer, scale, softcap)
        np.testing.assert_allclose(f(q, jnp.int32(layer)), want, rtol=2e-5, atol=2e-5)


def test_one_layer_pools_and_other_value_width():
    """Unstacked pools (NB, Z, K, H) without a layer, values of another width (latent attention's Hv)."""
    q, kp, vp, table, mask = case(1, Hv=8)
    got = paged_attention(q, kp[1], vp[1], table, mask)
    np.testing.assert_allclose(got, reference(q, kp[1][None], vp[1][None], table, mask, 0), rtol=2e-5, atol=2e-5)


def test_a_query_that_sees_nothing_gets_zeros_and_the_rest_are_untouched():
    q, kp, vp, table, mask = case(2, T=2)
    mask = mask.at[1, 0].set(False)
    got = np.array(paged_attention(q, kp, vp, table, mask, 0))
    want = np.asarray(reference(q, kp, vp, table, mask, 0))
    if kernels.available():
        assert not got[1, 0].any()
    got[1, 0] = want[1, 0]  # the reference gives the gathered values' mean there: a padding query
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_long_prefill_chunks_and_other_dtypes_take_xla():
    q, kp, vp, table, mask = case(3, T=12)
    hlo = jax.jit(lambda q: paged_attention(q, kp, vp, table, mask, 0)).lower(q).as_text()
    assert "jaxlm_paged_attention" not in hlo
    bf = jax.jit(lambda q: paged_attention(q, kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16), table, mask[:, :1], 0))
    assert "jaxlm_paged_attention" not in bf.lower(q[:, :1]).as_text()


def test_kernel_is_in_the_cpu_program_where_a_compiler_is():
    if os.environ.get("JAXLM_KERNELS") == "0" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("kernels turned off, or no C++ compiler: the XLA path stands in")
    q, kp, vp, table, mask = case(4)
    traced = jax.jit(lambda q: paged_attention(q, kp, vp, table, mask, 0)).trace(q)
    assert "jaxlm_paged_attention" in traced.lower(lowering_platforms=("cpu",)).as_text()
