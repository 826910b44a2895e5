"""Context parallelism: the sequence split over the `context` mesh axis, attention as ring attention.

Each device of the context axis holds T/C tokens of every row: its queries stay, and the keys and values (with
their positions, validity, segments and prefix flags) travel around the ring with `ppermute`, one shard a
step; an online softmax merges the C partial attentions (Liu et al. 2023, "Ring Attention with Blockwise
Transformers"). Each step is blockwise attention (`jaxlm.ops.blockwise.Tiles`), so no device ever holds more
than a tile of scores. The backward pass runs the ring again, the keys' gradients travelling with them and
arriving home after C steps.

Causal attention over contiguous shards would leave device 0 idle after one step and device C-1 busy for C.
`zigzag` lays the sequence out so that device d holds chunks d and 2C-1-d of 2C (as in Megatron's context
parallelism and zig-zag ring attention): every device has as many early as late tokens, and the fully masked
tiles it skips balance out. Every mask is built from positions, so the layout changes nothing but the order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.axes import BATCH_AXES
from jaxlm.ops.blockwise import Tiles, merge, padded_spec, row_delta, sink_grad, with_sinks
from jaxlm.ops.masks import MaskSpec, PositionBias

AXIS = "context"


def zigzag(x: jax.Array, C: int, axis: int = 1) -> jax.Array:
    """The sequence axis reordered so that its C contiguous shards are the chunk pairs (d, 2C-1-d) of 2C."""
    x = jnp.moveaxis(x, axis, 0)
    T = x.shape[0]
    halves = x.reshape(2, C, T // (2 * C), *x.shape[1:])
    pairs = jnp.stack([halves[0], jnp.flip(halves[1], axis=0)], axis=1)  # (C, 2, T/2C, ...)
    return jnp.moveaxis(pairs.reshape(T, *x.shape[1:]), 0, axis)


def unzigzag(x: jax.Array, C: int, axis: int = 1) -> jax.Array:
    """The inverse of `zigzag`."""
    x = jnp.moveaxis(x, axis, 0)
    T = x.shape[0]
    pairs = x.reshape(C, 2, T // (2 * C), *x.shape[1:])
    halves = jnp.stack([pairs[:, 0], jnp.flip(pairs[:, 1], axis=0)])  # (2, C, T/2C, ...)
    return jnp.moveaxis(halves.reshape(T, *x.shape[1:]), 0, axis)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh,
    mask: MaskSpec,
    bias: PositionBias | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
    block_size: int = 512,
) -> jax.Array:
    """`jaxlm.ops.blockwise.blockwise_attention` with q, k, v and the mask's arrays split over `mesh`'s context
    axis along the sequence (self-attention: S = T, one layout). The batch stays split over the batch axes;
    heads over `tensor` when both head counts divide it and no bias needs every head (else each tensor rank
    computes every head).

    q: (B, T, N, H); k, v: (B, T, K, H|Hv); mask over (B, T) queries and keys. Returns (B, T, N, Hv).
    """
    C = mesh.shape[AXIS]
    B, T, N, H = q.shape
    K = k.shape[2]
    tp = mesh.shape.get("tensor", 1)
    heads = "tensor" if tp > 1 and N % tp == 0 and K % tp == 0 and bias is None else None
    mask = padded_spec(mask, B, T, T, T, T)  # every array (B, T), so that each splits as the rows do
    mask_specs = jax.tree.map(lambda a: P(BATCH_AXES, AXIS) if a.ndim == 2 else P(), mask)
    params = () if bias is None else bias.params
    has_sinks = sinks is not None
    sinks = jnp.zeros((N,), jnp.float32) if sinks is None else sinks
    bias_fn = None if bias is None else bias.fn
    split = (*BATCH_AXES, AXIS)  # what q varies over besides heads (sinks already vary over theirs)

    def local(q, k, v, params, sinks, mask):
        # Parameters vary over the devices from here: each device's gradient is partial, and the cast's
        # transpose sums them.
        params, sinks = jax.tree.map(lambda a: jax.lax.pcast(a, split, to="varying"), (params, sinks))
        tiles = Tiles.of(
            q,
            k,
            mask=mask,
            bias=None if bias_fn is None else PositionBias(params, bias_fn),
            scale=scale,
            softcap=softcap,
            block_q=block_size,
            block_k=block_size,
        )
        return _ring(tiles, C, has_sinks)(q, k, v, params, sinks, mask)

    head_spec = P(BATCH_AXES, AXIS, heads, None)
    param_specs = jax.tree.map(lambda _: P(), params)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(head_spec, head_spec, head_spec, param_specs, P(heads), mask_specs),
        out_specs=head_spec,
    )(q, k, v, params, sinks, mask)


def _ring(tiles: Tiles, C: int, has_sinks: bool):
    """The custom-VJP ring over one device's shards: q (B, T/C, n, H), its own k, v and mask arrays."""
    perm = [(i, (i + 1) % C) for i in range(C)]
    shift = lambda x: jax.lax.ppermute(x, AXIS, perm)  # noqa: E731

    key_fields = ("kv_positions", "kv_valid", "kv_segments", "kv_prefix")  # what travels with the keys

    def keys_of(mask: MaskSpec) -> dict:
        return {f: getattr(mask, f) for f in key_fields}

    def with_keys(mask: MaskSpec, keys: dict) -> MaskSpec:
        return dataclasses.replace(mask, **keys)

    def forward(q, k, v, params, sinks, mask):
        out = jnp.zeros((*q.shape[:3], v.shape[-1]), jnp.float32)
        lse = jnp.full(q.shape[:3], -jnp.inf)
        visiting = (k, v, keys_of(mask))
        for step in range(C):  # C is a handful: unrolled, so XLA can overlap each shift with the next step
            kv, vv, keys = visiting
            part, part_lse = tiles.forward(q, kv, vv, params, with_keys(mask, keys))
            out, lse = merge(out, lse, part, part_lse)
            if step < C - 1:
                visiting = jax.tree.map(shift, visiting)
        if has_sinks:
            out, lse = with_sinks(out, lse, sinks)
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def ring(q, k, v, params, sinks, mask):
        return forward(q, k, v, params, sinks, mask)[0]

    def ring_fwd(q, k, v, params, sinks, mask):
        out, lse = forward(q, k, v, params, sinks, mask)
        return out, (q, k, v, params, sinks, mask, out, lse)

    def ring_bwd(res, d_out):
        q, k, v, params, sinks, mask, out, lse = res
        delta = row_delta(d_out, out)
        dq = jnp.zeros(q.shape, jnp.float32)
        d_params = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)
        visiting = (k, v, keys_of(mask))
        d_kv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        for step in range(C):
            kv, vv, keys = visiting
            dq_s, dk_s, dv_s, dp_s = tiles.backward(q, kv, vv, params, with_keys(mask, keys), lse, delta, d_out)
            dq = dq + dq_s
            d_params = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_params, dp_s)
            d_kv = (d_kv[0] + dk_s, d_kv[1] + dv_s)
            d_kv = jax.tree.map(shift, d_kv)  # after C shifts each shard's gradient is home
            if step < C - 1:
                visiting = jax.tree.map(shift, visiting)
        d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, params)
        d_sinks = sink_grad(sinks, lse, delta) if has_sinks else None
        dk, dv = d_kv
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_params, d_sinks, None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring
