"""Context parallelism: the sequence split over mesh.context, ring attention equal to one device (forward,
gradients, training), composed with data, FSDP and tensor parallelism; what it cannot run is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError, MeshConfig, load_config
from jaxlm.ops.attention import MaskSpec, PositionBias, dot_product_attention
from jaxlm.ops.positions import t5_bias
from jaxlm.parallel.context import ring_attention, unzigzag, zigzag
from jaxlm.parallel.mesh import make_mesh
from jaxlm.train.sharded import ShardedTraining
from tests.parallel.test_layouts import BASE, assert_same, batches, reference, train_steps

BLOCKWISE = ["model.attention_impl=blockwise", "model.attention_block=4"]


def test_zigzag_gives_each_device_an_early_and_a_late_chunk():
    C, T = 4, 16
    order = np.asarray(zigzag(jnp.arange(T)[None], C))[0]
    shards = order.reshape(C, -1)  # device d's tokens
    for d in range(C):
        np.testing.assert_array_equal(shards[d], np.r_[2 * d : 2 * d + 2, T - 2 * d - 2 : T - 2 * d])
    x = jnp.arange(2 * T * 3).reshape(2, T, 3)
    np.testing.assert_array_equal(unzigzag(zigzag(x, C), C), x)


B, T, N, K, H = 2, 64, 4, 2, 8
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.float32) for n in (N, K, K))
pos = jnp.broadcast_to(jnp.arange(T), (B, T))
valid = jnp.arange(T)[None] < jnp.array([[T], [50]])
seg = jnp.asarray((np.arange(T)[None] >= np.array([[10], [40]])).astype(np.int32))
table = jnp.asarray(rng.normal(size=(32, N)), jnp.float32)
sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
CASES = {
    "causal": dict(mask=MaskSpec(pos, pos, valid)),
    "everything": dict(  # segments, a window, a learned bias, soft-capping and sinks at once
        mask=MaskSpec(pos, pos, valid, q_segments=seg, kv_segments=seg, window=jnp.int32(9)),
        bias=PositionBias(table, functools.partial(t5_bias, bidirectional=True, max_distance=64)),
        softcap=3.0,
        sinks=sinks,
    ),
    "bidirectional": dict(mask=MaskSpec(pos, pos, valid, causal=False)),
}


@pytest.mark.parametrize("context", [4, 8])
@pytest.mark.parametrize("name", CASES)
def test_ring_attention_equals_one_device(name, context):
    case, C = CASES[name], context
    mesh = make_mesh(MeshConfig(data=8 // C, context=C))
    weights = jnp.sin(jnp.arange(q.size).reshape(q.shape))

    def loss(ring, q, k, v, params, sinks):
        m = case["mask"]
        bias = PositionBias(params, case["bias"].fn) if "bias" in case else None
        kw = dict(bias=bias, softcap=case.get("softcap", 0.0), sinks=sinks if "sinks" in case else None)
        if ring:
            z = lambda a: None if a is None else zigzag(a, C)  # noqa: E731
            arrays = (m.q_positions, m.kv_positions, m.kv_valid, m.q_segments, m.kv_segments, m.q_prefix, m.kv_prefix)
            mask = MaskSpec(*map(z, arrays), window=m.window, causal=m.causal)
            out = unzigzag(ring_attention(z(q), z(k), z(v), mesh=mesh, mask=mask, block_size=8, **kw), C)
        else:
            out = dot_product_attention(q, k, v, mask=m, implementation="blockwise", block_size=8, **kw)
        return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) * weights)

    args = (q, k, v, table, sinks)
    one, ring = (jax.jit(jax.value_and_grad(functools.partial(loss, r), argnums=range(5)))(*args) for r in (0, 1))
    np.testing.assert_allclose(ring[0], one[0], rtol=1e-5)
    for g, r in zip(ring[1], one[1]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r)) + 1))


LAYOUTS = {
    "context=4 data=2": ["mesh.data=2", "mesh.context=4"],
    "context=8": ["mesh.data=1", "mesh.context=8"],
    "context=2 fsdp=2 tensor=2": ["mesh.data=1", "mesh.context=2", "mesh.fsdp=2", "mesh.tensor=2"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_under_context_parallelism_matches_one_device(layout):
    losses, params, sharded = train_steps(LAYOUTS[layout] + BLOCKWISE)
    assert sharded.mesh.shape["context"] > 1
    assert_same((losses, params), reference(extra=BLOCKWISE))
    assert losses[-1] < losses[0]


def test_the_ring_passes_keys_between_devices():
    sharded = ShardedTraining(load_config("configs/llama_tiny.yaml", BASE + LAYOUTS["context=4 data=2"] + BLOCKWISE))
    state = sharded.init_state()
    hlo = sharded.train_step.lower(state, sharded.put_batch(batches(1)[0])).as_text()
    assert "collective_permute" in hlo or "collective-permute" in hlo


@pytest.mark.parametrize(
    "extra, message",
    [
        (["mesh.data=2", "mesh.context=4"], "model.attention_impl=blockwise"),
        (["mesh.data=2", "mesh.context=4", *BLOCKWISE, "data.seq_len=28", "model.max_seq_len=28"], "data.seq_len"),
        (["mesh.data=2", "mesh.context=2", "mesh.pipeline=2", *BLOCKWISE], "mesh.pipeline"),
        (["mesh.data=4", "mesh.context=2", *BLOCKWISE, "model.attention_block=64"], "model.attention_block"),
    ],
)
def test_what_context_parallelism_cannot_run_is_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        ShardedTraining(load_config("configs/llama_tiny.yaml", BASE + extra))


def test_encoder_decoders_are_refused():
    with pytest.raises(ConfigError, match="encoder-decoders"):
        load_config("configs/t5_tiny.yaml", ["mesh.context=2", "model.attention_impl=blockwise"])
