"""LoRA and NF4 ops: peft's initialisation and scaling, merged = unmerged, NF4 levels and round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.attention import attention_mask
from jaxlm.ops.lora import init_lora, lora_delta, lora_scale, lora_weight
from jaxlm.ops.nf4 import dequantize_nf4, nf4_bytes, nf4_levels, quantize_nf4

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), the paper's Appendix E values.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]  # fmt: skip


def test_lora_init_and_scale_follow_peft():
    a, b = init_lora(jax.random.PRNGKey(0), (64,), (4, 8), 8)
    assert a.shape == (64, 8) and b.shape == (8, 4, 8)
    assert np.all(np.asarray(b) == 0)
    bound = 1 / np.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on a (r, fan_in) weight
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert lora_scale(16, 8) == 2.0 and lora_scale(16, 16, rslora=True) == 4.0


def test_lora_delta_equals_merged_weight():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k1, (2, 5, 4, 8))  # BTNH, an output projection's input
    a = jax.random.normal(k2, (4, 8, 3))
    b = jax.random.normal(k3, (3, 16))
    want = jnp.tensordot(x, lora_weight(a, b, 0.5), 2)
    np.testing.assert_allclose(lora_delta(x, a, b, 0.5, n=2), want, rtol=1e-5, atol=1e-5)


def test_nf4_levels_equal_bitsandbytes_table():
    np.testing.assert_allclose(nf4_levels(), BNB_NF4, atol=3e-7)


@pytest.mark.parametrize("shape", [(64, 64), (3, 100, 7)])
def test_nf4_round_trip_error_and_size(shape):
    w = jax.random.normal(jax.random.PRNGKey(2), shape)
    q = quantize_nf4(w)
    back = dequantize_nf4(q, shape)
    err = float(jnp.mean(jnp.abs(back - w)))
    assert err < 0.08, err  # measured 0.073 on N(0, 1) (blocks of 64)
    # every weight maps to its nearest level (times its block's absmax, itself 8-bit)
    assert float(jnp.max(jnp.abs(back - w))) < 0.25 * float(jnp.max(jnp.abs(w)))
    big = quantize_nf4(jnp.zeros((4096, 1024)))
    assert nf4_bytes(big) * 8 / (4096 * 1024) < 4.2  # 4.127 bits per parameter with double quantization


def test_segment_and_prefix_masks():
    pos = jnp.array([[0, 1, 2, 0, 1, 2]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    m = attention_mask(pos, pos, q_segments=seg, kv_segments=seg)[0]
    assert not m[3:, :3].any() and not m[:3, 3:].any()  # never across examples
    assert m[2, :3].all() and not m[0, 1]  # causal inside
    pre = jnp.array([[True, True, False, True, False, False]])
    m = attention_mask(pos, pos, q_segments=seg, kv_segments=seg, q_prefix=pre, kv_prefix=pre)[0]
    assert m[0, 1] and not m[0, 2]  # the prefix sees the whole prefix, not the rest
    assert m[2, :3].all() and not m[3, 4]
