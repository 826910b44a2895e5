"""Expert parallelism: a mixture's experts split over the `expert` mesh axis, tokens sent to their experts'
devices and back with two all-to-alls (GShard), under `shard_map`.

Each device of the expert axis holds E/P experts and its own rows of the batch (the batch is split over
data x fsdp x expert). It routes its tokens (the router ran outside, on every token), sorts its assignments
by destination device into P send buffers of S rows, and one `all_to_all` delivers each buffer: a device
receives P x S rows for its experts, runs them (`jaxlm.ops.moe.run_experts`, dropless) and a second
`all_to_all` returns the outputs to the rows they came from.

S is the most assignments a device may send one device. Dropless (capacity_factor 0), S is every local
assignment (M_l k): nothing is ever dropped, but each all-to-all moves P times the rows in use, and the
receiving device loops over empty rows' blocks cheaply (skipped). With capacity_factor f, S = ceil(f M_l k / P)
and assignments past it are dropped (counted): the all-to-all moves f times the mean load.

Inside the map the other mesh axes are replicated: expert weights sharded over fsdp (ZeRO-3) or tensor are
gathered for the experts' matmuls, and their gradients reduced back by the map's transpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.axes import BATCH_AXES
from jaxlm.ops.moe import (
    Routing,
    block_layout,
    block_size,
    combine,
    dispatch,
    group_sort,
    resolve_impl,
    run_experts,
    take_rows,
)


def expert_parallel_mlp(
    x: jax.Array,
    routing: Routing,
    w_in,
    w_out: jax.Array,
    *,
    mesh,
    b_in=None,
    b_out=None,
    loras=None,
    act: str = "silu",
    clamp: float = 0.0,
    up_shift: float = 0.0,
    capacity_factor: float = 0.0,
    impl: str = "blocks",
    block: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """`jaxlm.ops.moe.expert_mlp` with the experts split over the mesh's `expert` axis.

    x: (M, D) tokens (rows split over the batch axes); w_in / w_out / biases and the per-expert LoRAs' A and
    B: (E, ...) split over `expert`. Returns (M, D) and the number of assignments dropped (0 when dropless)."""
    P_ = mesh.shape["expert"]
    E = w_out.shape[0]
    local_experts = E // P_
    batch = P(BATCH_AXES)
    experts_spec = lambda a: P("expert", *([None] * (a.ndim - 1)))  # noqa: E731
    gated = isinstance(w_in, (tuple, list))
    pairs_in, pair_out = loras or (None, None)
    pairs = [*((pairs_in or (None, None)) if gated else [pairs_in]), pair_out]  # each (A, B, scale) or None
    scales = [None if p is None else p[2] for p in pairs]  # floats: they stay out of the map
    weights = (w_in, w_out, b_in, b_out, [None if p is None else p[:2] for p in pairs])
    impl = resolve_impl(impl)

    def local(x, expert_ids, gate_weights, weights):
        # The weights vary over the batch axes from here (each device's gradient is partial until the cast's
        # transpose sums it), as the rows they multiply do: what grouped_matmul's custom gradient expects.
        others = tuple(a for a in BATCH_AXES if a != "expert")
        w_in, w_out, b_in, b_out, ab = jax.tree.map(lambda a: jax.lax.pcast(a, others, to="varying"), weights)
        pairs = [None if a is None else (*a, s) for a, s in zip(ab, scales)]
        loras = ((tuple(pairs[:2]) if gated else pairs[0]), pairs[-1]) if any(pairs) else None
        M, D = x.shape
        k = expert_ids.shape[1]
        A = M * k
        S = A if capacity_factor <= 0 else max(1, math.ceil(capacity_factor * A / P_))
        dest = expert_ids // local_experts  # (M, k): the device of each assignment
        order, dest_sorted, rank, _ = group_sort(dest, P_)
        keep = rank < S
        slot = jnp.where(keep, dest_sorted * S + rank, P_ * S)  # send-buffer row of each sorted assignment
        send_rows = jnp.full((P_ * S,), A, jnp.int32).at[slot].set(order, mode="drop")  # assignment a row holds
        token = jnp.where(send_rows < A, send_rows // k, M)
        send_x = take_rows(x, token)
        flat_local = (expert_ids % local_experts).reshape(-1)
        send_e = jnp.where(send_rows < A, take_rows(flat_local, send_rows), -1)
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)  # (P S, D): S rows from each device
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
        # The received rows as tokens routed to one local expert each; empty rows to a sentinel (local_experts)
        # whose blocks are skipped.
        ids = jnp.where(recv_e < 0, local_experts, recv_e)[:, None]
        b = 1 if impl == "ragged" else block_size(P_ * S, local_experts, block)
        layout = block_layout(ids, local_experts + 1, b)
        layout = layout._replace(block_used=layout.block_used & (layout.block_expert < local_experts))
        rows = dispatch(recv_x, layout, 1)
        out = run_experts(
            rows,
            layout,
            b,
            w_in,
            w_out,
            b_in=b_in,
            b_out=b_out,
            loras=loras,
            act=act,
            clamp=clamp,
            up_shift=up_shift,
            kind=impl,
        )
        back = jax.lax.all_to_all(combine(out, layout), "expert", 0, 0, tiled=True)  # (P S, D) in send order
        sent = jnp.zeros((A,), jnp.int32).at[order].set(slot)  # each assignment's send row (P S: dropped)
        y = take_rows(back, sent).reshape(M, k, D)
        y = jnp.einsum("MkD,Mk->MD", y, gate_weights.astype(y.dtype))
        dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.int32), BATCH_AXES)
        return y, dropped

    spec_tree = jax.tree.map(experts_spec, weights)
    y, dropped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(batch, batch, batch, spec_tree),
        out_specs=(batch, P()),
    )(x, routing.experts, routing.weights, weights)
    return y, dropped
