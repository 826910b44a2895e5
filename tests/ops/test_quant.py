"""Weight-only quantized matmuls: int8 and NF4 strips, int8 rows; the native CPU kernels equal XLA's ops on the
same codes, for every row count and for shapes that are not multiples of the strip or vector width."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import kernels
from jaxlm.ops import quant

SHAPES = [(64, 128), (48, 100), (576, 192), (17, 64)]  # (K, C): C padded to 64; K % 16 != 0 takes the plain loop
ROWS = [1, 3, 6, 11, 200]  # passes of 6 rows and the rest; 200: blocks of 96 rows (plain), XLA's dot (int8, NF4)


def _w(K, C, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (K, C)) * 0.05


def _x(M, K, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (M, K))


@pytest.fixture
def xla_only(monkeypatch):
    monkeypatch.setattr(quant.kernels, "available", lambda: False)


def test_kernels_build_where_a_compiler_is():
    if os.environ.get("JAXLM_KERNELS") == "0" or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("kernels turned off, or no C++ compiler: the XLA path stands in")
    assert kernels.available()
    traced = jax.jit(quant.int8_matmul, static_argnums=2).trace(_x(2, 64), quant.quantize_int8(_w(64, 128)), 128)
    # Lowered for the CPU whatever the default backend (on a GPU the XLA branch is taken).
    assert "jaxlm_int8_matmul" in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_int8_codes_round_to_half_a_step():
    w = _w(48, 100)
    p = quant.quantize_int8(w)
    assert p.q.shape == (2, 48, 64) and p.q.dtype == jnp.int8 and p.scale.shape == (128,)
    err = jnp.abs(quant.dequantize_int8(p, 100) - w)
    assert bool(jnp.all(err <= p.scale[:100] / 2 + 1e-7))
    np.testing.assert_array_equal(p.scale[100:], 0.0)  # the padding columns


@pytest.mark.parametrize("K,C", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_int8_matmul_equals_the_dequantized_weight(K, C, M):
    p = quant.quantize_int8(_w(K, C))
    x = _x(M, K)
    want = x @ quant.dequantize_int8(p, C)
    got = jax.jit(quant.int8_matmul, static_argnums=2)(x, p, C)
    assert got.shape == (M, C)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,C", SHAPES)
@pytest.mark.parametrize("M", ROWS)
def test_nf4_matmul_equals_the_dequantized_weight(K, C, M):
    w = _w(K, C)
    q = quant.quantize_nf4_strips(w)
    wd = quant.dequantize_nf4_strips(q, K, C)
    assert float(jnp.max(jnp.abs(wd - w))) < 0.2 * float(jnp.max(jnp.abs(w)))
    x = _x(M, K)
    got = jax.jit(quant.nf4_matmul, static_argnums=2)(x, q, C)
    np.testing.assert_allclose(got, x @ wd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,C", SHAPES)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("dtype", quant.PLAIN)
def test_plain_matmul(K, C, M, dtype):
    """bfloat16 and float32 strips: stored values exact, products those of the stored weight."""
    w, x = _w(K, C), _x(M, K)
    p = quant.pack_plain(w, dtype)
    assert p.w.dtype == dtype and p.w.shape == (-(-C // 64), K, 64)
    wd = quant.unpack_plain(p, C)
    np.testing.assert_array_equal(wd, w.astype(dtype).astype(jnp.float32))
    np.testing.assert_allclose(jax.jit(quant.plain_matmul, static_argnums=2)(x, p, C), x @ wd, rtol=1e-5, atol=1e-5)


KINDS = {  # kind: (pack, several-weight matmul, dequantize (packed, K, C))
    "int8": (quant.quantize_int8, quant.int8_matmuls, lambda p, K, C: quant.dequantize_int8(p, C)),
    "nf4": (quant.quantize_nf4_strips, quant.nf4_matmuls, quant.dequantize_nf4_strips),
    "bf16": (
        lambda w: quant.pack_plain(w, jnp.bfloat16),
        quant.plain_matmuls,
        lambda p, K, C: quant.unpack_plain(p, C),
    ),
    "f32": (lambda w: quant.pack_plain(w, jnp.float32), quant.plain_matmuls, lambda p, K, C: quant.unpack_plain(p, C)),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M", [1, 7, 200])
def test_several_weights_in_one_call(kind, M):
    """Weights that take the same x (q, k, v: 576, 192 and 100 columns, the last padded) in one kernel call: each
    output equals that weight's own matmul, the gradient is Σ dy_i·W_iᵀ; one custom call where the kernel runs."""
    pack, matmuls, deq = KINDS[kind]
    K, cols = 96, (576, 192, 100)
    ps = tuple(pack(_w(K, c, seed=i)) for i, c in enumerate(cols))
    x = _x(M, K)
    fn = jax.jit(matmuls, static_argnums=2)
    ys = fn(x, ps, cols)
    assert [y.shape for y in ys] == [(M, c) for c in cols]
    for y, p, c in zip(ys, ps, cols):
        np.testing.assert_allclose(y, x @ deq(p, K, c), rtol=1e-5, atol=1e-5)
    if kernels.available():  # int8 and NF4 above KERNEL_MAX_ROWS rows take XLA's dots: no call
        kernel = M <= quant.KERNEL_MAX_ROWS or kind in ("bf16", "f32")
        assert fn.lower(x, ps, cols).as_text().count("stablehlo.custom_call @jaxlm_") == int(kernel)
    dys = tuple(jax.random.normal(jax.random.PRNGKey(i), (M, c)) for i, c in enumerate(cols))
    dx = jax.grad(lambda x: sum(jnp.sum(y * dy) for y, dy in zip(matmuls(x, ps, cols), dys)))(x)
    want = sum(dy @ deq(p, K, c).T for dy, p, c in zip(dys, ps, cols))
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4)


def test_one_call_takes_plain_weights_of_one_dtype():
    w = _w(64, 64)
    with pytest.raises(ValueError, match="one dtype"):
        quant.plain_matmuls(_x(2, 64), (quant.pack_plain(w, jnp.float32), quant.pack_plain(w, jnp.bfloat16)), (64, 64))


@pytest.mark.parametrize("V,D", [(300, 32), (70, 20)])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_a_table_as_strips_looks_up_and_reads_out(V, D, M):
    """An embedding table stored as the strips of its transpose: one int8 scale a token row, a lookup gathers
    each token's column, the read-out is the strips' matmul ('MD,VD->MV')."""
    table = jax.random.normal(jax.random.PRNGKey(3), (V, D))
    p = quant.quantize_int8(table.T)
    deq = quant.dequantize_int8(p, V).T
    assert bool(jnp.all(jnp.abs(deq - table) <= p.scale[:V, None] / 2 + 1e-7))
    ids = jnp.array([[0, V - 1, 5], [64, 63, 1]])
    np.testing.assert_allclose(quant.int8_lookup(p, ids), deq[ids], rtol=1e-6)
    x = _x(M, D)
    np.testing.assert_allclose(jax.jit(quant.int8_matmul, static_argnums=2)(x, p, V), x @ deq.T, rtol=1e-5, atol=1e-5)
    for dtype in quant.PLAIN:
        plain = quant.pack_plain(table.T, dtype)
        np.testing.assert_array_equal(quant.plain_lookup(plain, ids), table.astype(dtype).astype(jnp.float32)[ids])


def test_the_xla_path_gives_the_same_values(xla_only):
    """Without the kernels (no compiler, JAXLM_KERNELS=0, a GPU), the same numbers from XLA's own ops."""
    K, C = 48, 100
    x, w = _x(3, K), _w(K, C)
    p, q = quant.quantize_int8(w), quant.quantize_nf4_strips(w)
    hlo = jax.jit(lambda x, p: quant.int8_matmul(x, p, C)).lower(x, p).as_text()  # a fresh trace
    assert "custom_call" not in hlo
    np.testing.assert_allclose(quant.int8_matmul(x, p, C), x @ quant.dequantize_int8(p, C), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quant.nf4_matmul(x, q, C), x @ quant.dequantize_nf4_strips(q, K, C), rtol=1e-5)


def test_gradient_flows_to_x_only():
    """QLoRA trains through the frozen NF4 weight: dx = dy·Wᵀ; the codes get no gradient."""
    K, C = 64, 100
    x, w = _x(4, K), _w(K, C)
    for pack, matmul, deq in [
        (quant.quantize_int8, quant.int8_matmul, lambda p: quant.dequantize_int8(p, C)),
        (quant.quantize_nf4_strips, quant.nf4_matmul, lambda q: quant.dequantize_nf4_strips(q, K, C)),
    ]:
        p = pack(w)
        dy = jax.random.normal(jax.random.PRNGKey(9), (4, C))
        dx = jax.grad(lambda x, matmul=matmul, p=p, dy=dy: jnp.sum(matmul(x, p, C) * dy))(x)
        np.testing.assert_allclose(dx, dy @ deq(p).T, rtol=1e-5, atol=1e-5)


def test_stacked_layers_scan_and_bf16_inputs():
    """Per-layer weights scanned out of a stack; bf16 activations come back in bf16."""
    K, C, L = 64, 128, 3
    ws = jax.random.normal(jax.random.PRNGKey(0), (L, K, C)) * 0.05
    p = jax.vmap(quant.quantize_int8)(ws)
    x = _x(2, K).astype(jnp.bfloat16)
    ys = jax.lax.scan(lambda c, pl: (c, quant.int8_matmul(x, quant.Int8(*pl), C)), 0, tuple(p))[1]
    assert ys.dtype == jnp.bfloat16 and ys.shape == (L, 2, C)
    for i in range(L):
        want = x.astype(jnp.float32) @ quant.dequantize_int8(quant.Int8(p.q[i], p.scale[i]), C)
        np.testing.assert_allclose(ys[i].astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


def test_sharded_operands_give_the_same_values():
    """Under a mesh (rows split, or a weight split over K) the kernel's custom call runs on gathered operands:
    the same values."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",))
    K, C = 64, 128
    p, x = quant.quantize_int8(_w(K, C)), _x(16, K)
    want = x @ quant.dequantize_int8(p, C)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    split = quant.Int8(jax.device_put(p.q, NamedSharding(mesh, P(None, "data", None))), p.scale)
    for q in (p, split):
        got = jax.jit(lambda x, q: quant.int8_matmul(x, q, C))(xs, q)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_nf4_weight_of_other_rows_is_refused():
    """NF4 codes are padded to whole blocks of 16,384, and the kernel would compute with too small a K: x's
    columns are checked against the codes (to those blocks) before any call."""
    q = quant.quantize_nf4_strips(jnp.ones((300, 64), jnp.float32))  # 19,200 weights: two blocks of 16,384
    with pytest.raises(ValueError, match="x has 200 columns"):
        quant.nf4_matmul(jnp.ones((1, 200), jnp.float32), q, 64)
    with pytest.raises(ValueError, match="x has 600 columns"):
        quant.nf4_matmul(jnp.ones((1, 600), jnp.float32), q, 64)
