"""Mixture of experts as pure functions: the router, the dispatch of tokens to their experts, the experts'
MLPs over the dispatched rows, and the router's auxiliary losses.

Letters (STYLE.md): M tokens (batch and time flattened), D model width, E experts, F expert hidden width,
k experts a token, A = M * k assignments (token m's j-th expert is assignment m * k + j), R dispatched rows,
b rows a block, nb blocks, C rows an expert (capacity dispatch).

Dispatch sorts the assignments by expert into rows, runs each expert's MLP over its rows, and gathers each
assignment's output back. Four layouts of the rows:
- `block_layout` (dropless): each expert's rows padded to whole blocks of b rows; the experts' matmuls are a
  loop over blocks, each one (b, D) x (D, F) against its expert's weights (`grouped_matmul`). XLA:CPU lowers
  `jax.lax.ragged_dot` to a dense matmul against every expert, masked (E times the work: 26x slower than the
  dense matmul of equal work at E = 16, measured); the block loop runs at about half the dense rate.
- `split_layout` (dropless, many rows an expert): each expert's first C rows (C: the mean load) in one
  batched (E, C, D) x (E, D, F) matmul, the overflow of the busier experts in a short loop of 32-row blocks;
  when the overflow does not fit its region (a skewed router), every row in 32-row blocks within the same
  rows (`split_matmul` chooses). Less padding (about 5% against 25%) and fewer, larger matmuls than blocks of
  128: forward + backward of a Qwen3-MoE-shaped layer (experiments/bench_moe.py) went from 0.47x to 0.53x the
  dense MLP's FLOP rate.
- `ragged`: the same rows unpadded, multiplied with `jax.lax.ragged_dot` (grouped-GEMM kernels on GPU/TPU).
- `capacity_layout`: at most C rows an expert (GShard/Switch): the assignments past an expert's capacity are
  dropped (their output is 0; the residual carries the token) and counted.
Dispatch and combine are gathers whose gradients are gathers too (a scatter is slow on CPU).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.choices import EXPERT_IMPLS, ROUTER_SCORES
from jaxlm.ops.mlp import activation, gated_activation


class Routing(NamedTuple):
    """What the router decides for M tokens."""

    weights: jax.Array  # (M, k) float32: each chosen expert's weight in the token's output
    experts: jax.Array  # (M, k) int32: the chosen experts, best first
    probs: jax.Array  # (M, E) float32: every expert's score (softmax or sigmoid), for the balancing loss
    logits: jax.Array  # (M, E) float32: the router's logits, for the z-loss


def route(
    logits: jax.Array,
    k: int,
    *,
    score: str = "softmax",
    normalize: bool = True,
    bias: jax.Array | None = None,
    scale: float = 1.0,
    groups: int = 1,
    group_limit: int = 0,
) -> Routing:
    """Top-k routing of (M, E) router logits.

    score: softmax (Mixtral, Qwen-MoE) or sigmoid (DeepSeek-V3) of the logits.
    normalize: the k weights of a token sum to 1 (softmax: the softmax over the chosen logits).
    bias: (E,) added to the scores only to choose the experts, never to weigh them (DeepSeek-V3's
      auxiliary-loss-free balancing), or None.
    scale: multiplies the weights (DeepSeek-V3's routed_scaling_factor).
    groups, group_limit: group-limited routing (DeepSeek-V3's n_group, topk_group): the E experts form `groups`
      groups of consecutive experts, each scored by the sum of its two best (biased) scores; a token chooses
      among the experts of its `group_limit` best groups only.
    """
    if score not in ROUTER_SCORES:
        raise ValueError(f"router score {score!r} not in {ROUTER_SCORES}")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
    choice = probs if bias is None else probs + bias.astype(jnp.float32)
    if groups > 1 and group_limit:
        M, E = choice.shape
        grouped = choice.reshape(M, groups, E // groups)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, E // groups))[0], axis=-1)  # (M, groups)
        _, best = jax.lax.top_k(group_scores, group_limit)
        allowed = jnp.zeros((M, groups), bool).at[jnp.arange(M)[:, None], best].set(True)
        choice = jnp.where(allowed[:, :, None], grouped, -jnp.inf).reshape(M, E)
    _, experts = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(weights * scale, experts.astype(jnp.int32), probs, logits)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """Assignments routed to each expert: (M, k) expert ids -> (E,) int32."""
    return jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].add(1)


def load_balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch/GShard balancing loss E * sum_e f_e * P_e: f_e the fraction of the M tokens routed to expert e
    (summing to k over the experts, as Hugging Face's load_balancing_loss_func), P_e the mean score of e.
    1 * k for a uniform router. probs: (M, E); experts: (M, k)."""
    M, E = probs.shape
    f = expert_counts(experts, E) / M
    return E * jnp.sum(f * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2 ((M, E) -> scalar)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


class Layout(NamedTuple):
    """Where each assignment goes among the R dispatched rows (laid out as nb blocks of b rows)."""

    assign: jax.Array  # (R,) int32: the assignment in each row; A for a row that holds none (padding)
    slot: jax.Array  # (A,) int32: the row of each assignment; R for a dropped one
    block_expert: jax.Array  # (nb,) int32: the expert of each block
    block_used: jax.Array  # (nb,) bool: whether a block holds any assignment
    counts: jax.Array  # (E,) int32: assignments routed to each expert (before drops)
    dropped: jax.Array  # () int32: assignments dropped (capacity dispatch)


def group_sort(experts: jax.Array, num_experts: int):
    """The assignments sorted by expert: (order, expert of each sorted one, its rank within its expert, counts)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    expert = flat[order]
    counts = expert_counts(flat, num_experts)
    first = jnp.cumsum(counts) - counts
    rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - first[expert]
    return order, expert, rank, counts


def _layout(order, rows, R, block_expert, block_used, counts, dropped) -> Layout:
    A = order.shape[0]
    assign = jnp.full((R,), A, jnp.int32).at[rows].set(order, mode="drop")
    slot = jnp.zeros((A,), jnp.int32).at[order].set(jnp.where(rows < R, rows, R))
    return Layout(assign, slot, block_expert, block_used, counts, dropped)


def block_size(assignments: int, num_experts: int, block: int = 128) -> int:
    """Rows a block: `block`, or fewer (a power of two, at least 8) when the experts average fewer rows
    (decoding: a handful of tokens would otherwise fill mostly-empty blocks)."""
    mean = -(-assignments // num_experts)
    return max(1, min(block, max(8, 1 << (mean - 1).bit_length())))


def block_layout(experts: jax.Array, num_experts: int, block: int) -> Layout:
    """Dropless: each expert's rows padded to whole blocks of `block` rows. experts: (M, k)."""
    A, E, b = experts.size, num_experts, block
    nb = (A + E * (b - 1)) // b  # the most blocks any routing needs
    order, expert, rank, counts = group_sort(experts, E)
    padded = -(-counts // b) * b
    ends = jnp.cumsum(padded)
    rows = (ends - padded)[expert] + rank
    starts = jnp.arange(nb, dtype=jnp.int32) * b
    block_expert = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), E - 1).astype(jnp.int32)
    return _layout(order, rows, nb * b, block_expert, starts < ends[-1], counts, jnp.int32(0))


def capacity_layout(experts: jax.Array, num_experts: int, capacity: int) -> Layout:
    """At most `capacity` rows an expert (one block each); later assignments (in token order) are dropped."""
    E, C = num_experts, capacity
    order, expert, rank, counts = group_sort(experts, E)
    keep = rank < C
    rows = jnp.where(keep, expert * C + rank, E * C)
    used = counts > 0
    return _layout(order, rows, E * C, jnp.arange(E, dtype=jnp.int32), used, counts, jnp.sum(~keep).astype(jnp.int32))


OVERFLOW_BLOCK = 32  # rows a block of `split_layout`'s overflow


class Packing(NamedTuple):
    """How `split_matmul` runs the R rows of a `split_layout`: E groups of C rows (expert e's first C rows), then
    the overflow in blocks of OVERFLOW_BLOCK rows, when `fits`; else every row in blocks of OVERFLOW_BLOCK."""

    fits: jax.Array  # () bool: the overflow fit its blocks
    over_expert: jax.Array  # (nbo,) int32: the expert of each overflow block
    over_used: jax.Array  # (nbo,) bool
    all_expert: jax.Array  # (R / OVERFLOW_BLOCK,) int32: the fallback's block experts
    all_used: jax.Array  # (R / OVERFLOW_BLOCK,) bool


def split_sizes(assignments: int, num_experts: int, block: int = 128) -> tuple[int, int] | None:
    """(C, overflow blocks) of `split_layout` for A assignments: C the mean load rounded up to a whole block of
    OVERFLOW_BLOCK rows; room for an eighth of the assignments plus half a block an expert past C, and at least
    enough that every routing fits the R rows in blocks of OVERFLOW_BLOCK (the fallback). None when the experts
    average fewer than `block` rows (decoding, small batches: the block layout's few small blocks are cheaper)."""
    mean = -(-assignments // num_experts)
    if mean < block:
        return None
    E, b = num_experts, OVERFLOW_BLOCK
    C = -(-mean // b) * b
    rows = max(assignments // 8 + E * b // 2, assignments + E * (b - 1) - E * C)
    return C, -(-rows // b)


def split_layout(experts: jax.Array, num_experts: int, capacity: int, blocks: int) -> tuple[Layout, Packing]:
    """Dropless over R = E·C + blocks·OVERFLOW_BLOCK rows: an expert's first `capacity` assignments in its own
    C rows, the rest after them, each expert's padded to whole blocks of OVERFLOW_BLOCK rows, in `blocks`
    blocks; when the overflow does not fit them (a skewed routing), every expert's rows in blocks of
    OVERFLOW_BLOCK over the same R rows (`block_layout`). experts: (M, k). The layout's blocks are the
    fallback's; the Packing says which the rows hold."""
    E, C, b = num_experts, capacity, OVERFLOW_BLOCK
    order, expert, rank, counts = group_sort(experts, E)
    over = jnp.maximum(counts - C, 0)
    padded = -(-over // b) * b
    ends = jnp.cumsum(padded)
    fits = ends[-1] <= blocks * b
    R = E * C + blocks * b
    split_rows = jnp.where(rank < C, expert * C + rank, E * C + (ends - padded)[expert] + rank - C)
    starts = jnp.arange(blocks, dtype=jnp.int32) * b
    over_expert = jnp.minimum(jnp.searchsorted(ends, starts, side="right"), E - 1).astype(jnp.int32)
    # the fallback: block_layout's rows, over R rows (its most blocks fit: split_sizes)
    padded = -(-counts // b) * b
    ends_all = jnp.cumsum(padded)
    block_rows = (ends_all - padded)[expert] + rank
    starts_all = jnp.arange(R // b, dtype=jnp.int32) * b
    all_expert = jnp.minimum(jnp.searchsorted(ends_all, starts_all, side="right"), E - 1).astype(jnp.int32)
    rows = jnp.where(fits, split_rows, block_rows)
    layout = _layout(order, rows, R, all_expert, starts_all < ends_all[-1], counts, jnp.int32(0))
    return layout, Packing(fits, over_expert, starts < ends[-1], all_expert, layout.block_used)


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * tokens * k / E): an expert's rows under capacity dispatch."""
    return max(1, math.ceil(factor * tokens * k / num_experts))


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[rows] with rows == len(x) giving a row of zeros."""
    return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dispatch(x: jax.Array, layout: Layout, k: int) -> jax.Array:
    """Tokens (M, D) -> dispatched rows (R, D): each row holds its assignment's token (padding: zeros)."""
    A = layout.slot.shape[0]
    return take_rows(x, jnp.where(layout.assign < A, layout.assign // k, x.shape[0]))


def _dispatch_fwd(x, layout, k):
    return dispatch(x, layout, k), layout


def _dispatch_bwd(k, layout, d_rows):  # a token's gradient: the sum over its k rows
    return take_rows(d_rows, layout.slot).reshape(-1, k, d_rows.shape[-1]).sum(1), None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(rows: jax.Array, layout: Layout) -> jax.Array:
    """Dispatched rows (R, D) -> each assignment's row (A, D) (dropped: zeros)."""
    return take_rows(rows, layout.slot)


def _combine_fwd(rows, layout):
    return combine(rows, layout), layout


def _combine_bwd(layout, d_out):
    return take_rows(d_out, layout.assign), None


combine.defvjp(_combine_fwd, _combine_bwd)


def _block_matmul(xb, w, block_expert, block_used):
    def body(_, inputs):
        xi, e, used = inputs
        # zeros_like keeps xi's varying mesh axes (inside shard_map both branches must agree)
        zeros = lambda xi: jnp.zeros_like(xi, shape=(xi.shape[0], w.shape[2]))  # noqa: E731
        return None, jax.lax.cond(used, lambda xi: jnp.dot(xi, w[e]), zeros, xi)

    return jax.lax.scan(body, None, (xb, block_expert, block_used))[1]


@jax.custom_vjp
def grouped_matmul(xb: jax.Array, w: jax.Array, block_expert: jax.Array, block_used: jax.Array) -> jax.Array:
    """Each block of rows times its expert's matrix: (nb, b, D), (E, D, F) -> (nb, b, F); unused blocks give 0.

    A loop over blocks: one (b, D) x (D, F) matmul each. The custom gradient accumulates each block's weight
    gradient into its expert's in place (autodiff of the loop would add a whole (E, D, F) array a block)."""
    return _block_matmul(xb, w, block_expert, block_used)


def _grouped_fwd(xb, w, block_expert, block_used):
    return _block_matmul(xb, w, block_expert, block_used), (xb, w, block_expert, block_used)


def _block_grads(xb, w, block_expert, block_used, dy, dw):
    """(dxb, dw + each block's weight gradient added into its expert's, in place)."""

    def body(dw, inputs):
        xi, dyi, e, used = inputs

        def grads(dw):
            return dw.at[e].add(jnp.dot(xi.T, dyi).astype(dw.dtype)), jnp.dot(dyi, w[e].T).astype(xi.dtype)

        return jax.lax.cond(used, grads, lambda dw: (dw, jnp.zeros_like(xi)), dw)

    dw, dx = jax.lax.scan(body, dw, (xb, dy, block_expert, block_used))
    return dx, dw


def _grouped_bwd(res, dy):
    xb, w, block_expert, block_used = res
    dx, dw = _block_grads(xb, w, block_expert, block_used, dy, jnp.zeros_like(w))
    return dx, dw, None, None


grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def split_matmul(h: jax.Array, w: jax.Array, packing: Packing, capacity: int) -> jax.Array:
    """The rows of a `split_layout` (R, D) times their experts' matrices (E, D, F) -> (R, F): one batched
    (E, C, D) x (E, D, F) matmul and a loop over the overflow blocks; or, when the overflow did not fit, the loop
    over every row's blocks. The choice is made inside forward and backward, so the gradient keeps no rows of
    the path not taken (autodiff of a `jax.lax.cond` around the experts' MLP kept both paths' residuals: 15%
    slower here)."""
    E, C, b = w.shape[0], capacity, OVERFLOW_BLOCK

    def split():
        main = jnp.einsum("ECD,EDF->ECF", h[: E * C].reshape(E, C, -1), w).reshape(E * C, -1)
        over = _block_matmul(h[E * C :].reshape(-1, b, h.shape[-1]), w, packing.over_expert, packing.over_used)
        return jnp.concatenate([main, over.reshape(-1, w.shape[-1])])

    def fallback():
        out = _block_matmul(h.reshape(-1, b, h.shape[-1]), w, packing.all_expert, packing.all_used)
        return out.reshape(-1, w.shape[-1])

    return jax.lax.cond(packing.fits, split, fallback)


def _split_fwd(h, w, packing, capacity):
    return split_matmul(h, w, packing, capacity), (h, w, packing)


def _split_bwd(capacity, res, dy):
    h, w, packing = res
    E, C, b, D = w.shape[0], capacity, OVERFLOW_BLOCK, h.shape[-1]
    blocks = lambda a: a.reshape(-1, b, a.shape[-1])  # noqa: E731

    def split():
        hm, dym = h[: E * C].reshape(E, C, D), dy[: E * C].reshape(E, C, -1)
        dw = jnp.einsum("ECD,ECF->EDF", hm, dym).astype(w.dtype)
        dh_main = jnp.einsum("ECF,EDF->ECD", dym, w).astype(h.dtype).reshape(E * C, D)
        over = (blocks(h[E * C :]), w, packing.over_expert, packing.over_used, blocks(dy[E * C :]))
        dh_over, dw = _block_grads(*over, dw)
        return jnp.concatenate([dh_main, dh_over.reshape(-1, D)]), dw

    def fallback():
        dh, dw = _block_grads(blocks(h), w, packing.all_expert, packing.all_used, blocks(dy), jnp.zeros_like(w))
        return dh.reshape(-1, D), dw

    dh, dw = jax.lax.cond(packing.fits, split, fallback)
    return dh, dw, None


split_matmul.defvjp(_split_fwd, _split_bwd)


def resolve_impl(impl: str) -> str:
    """blocks or ragged for an `expert_impl` (auto: ragged on GPU and TPU, blocks on CPU)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert implementation {impl!r} not in {EXPERT_IMPLS}")
    if impl == "auto":
        return "blocks" if jax.default_backend() == "cpu" else "ragged"
    return impl


def expert_mlp(
    x: jax.Array,
    routing: Routing,
    w_in: jax.Array | tuple[jax.Array, jax.Array],
    w_out: jax.Array,
    *,
    b_in: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    b_out: jax.Array | None = None,
    loras=None,
    act: str = "silu",
    clamp: float = 0.0,
    up_shift: float = 0.0,
    capacity_factor: float = 0.0,
    impl: str = "blocks",
    block: int = 128,
) -> tuple[jax.Array, Layout]:
    """sum_j weights[m, j] * MLP_{experts[m, j]}(x[m]) for tokens x (M, D).

    w_in: (w_gate, w_up), each (E, D, F), for gated experts (act(x w_gate) * (x w_up)), or one (E, D, F) for
      plain ones (act(x w_in)); w_out: (E, F, D). b_in (like w_in, (E, F) each) and b_out (E, D): the experts'
      biases, or None. clamp, up_shift: gated experts' `jaxlm.ops.mlp.gated_activation` (gpt-oss).
    loras: per-expert LoRA pairs, (in, out) shaped like (w_in, w_out), each (A (E, I, R), B (E, R, O), scale)
      or None; or None for none.
    capacity_factor: > 0 dispatches at most ceil(factor * M * k / E) rows an expert and drops the rest
      (`capacity_layout`); 0 is dropless.
    impl: blocks (a loop of (b, D) x (D, F) matmuls) or ragged (`jax.lax.ragged_dot`: GPU/TPU kernels); auto:
      ragged on GPU and TPU, blocks on CPU. block: rows a block (at most).

    Returns (M, D) in x's dtype, and the layout (its counts and dropped for the router's statistics).
    """
    impl = resolve_impl(impl)
    M, D = x.shape
    k = routing.experts.shape[1]
    E = w_out.shape[0]
    experts = dict(b_in=b_in, b_out=b_out, loras=loras, act=act, clamp=clamp, up_shift=up_shift)

    def run(layout, b, kind, packing=None):  # each assignment's expert output (A, D)
        rows = dispatch(x, layout, k)  # (R, D)
        return combine(run_experts(rows, layout, b, w_in, w_out, kind=kind, packing=packing, **experts), layout)

    def blocks():
        b = 1 if impl == "ragged" else block_size(M * k, E, block)
        layout = block_layout(routing.experts, E, b)
        return run(layout, b, impl), layout

    split = split_sizes(M * k, E, block) if impl == "blocks" and capacity_factor <= 0 else None
    if capacity_factor > 0:
        b = capacity(M, k, E, capacity_factor)
        layout = capacity_layout(routing.experts, E, b)
        out = run(layout, b, "capacity")
    elif split is not None:
        C, nb = split
        layout, packing = split_layout(routing.experts, E, C, nb)
        out = run(layout, C, "split", packing)
    else:
        out, layout = blocks()
    out = out.reshape(M, k, D)  # (A, D) -> MkD
    return jnp.einsum("MkD,Mk->MD", out, routing.weights.astype(out.dtype)), layout


def run_experts(
    rows: jax.Array,
    layout: Layout,
    block: int,
    w_in,
    w_out: jax.Array,
    *,
    b_in=None,
    b_out=None,
    loras=None,
    act: str = "silu",
    clamp: float = 0.0,
    up_shift: float = 0.0,
    kind: str = "blocks",
    packing: Packing | None = None,
) -> jax.Array:
    """Each dispatched row (R, D) through its block's expert MLP -> (R, D); rows of unused blocks give 0.

    layout: rows in blocks of `block` rows (`block_layout`, or `capacity_layout` with block = C); experts with
    ids past the weights' E (a sentinel for empty rows) must sit in unused blocks. kind: blocks
    (`grouped_matmul`), ragged (`jax.lax.ragged_dot`, block 1), capacity (one batched matmul, one block an
    expert) or split (`split_layout`'s rows and Packing, block = C: `split_matmul`).
    Other arguments as `expert_mlp`'s."""
    # jax arrays: weights restored from a checkpoint may be NumPy arrays, which a traced expert cannot index
    w_in, w_out, b_in, b_out, loras = jax.tree.map(jnp.asarray, (w_in, w_out, b_in, b_out, loras))
    E = w_out.shape[0]
    nb = layout.block_expert.shape[0]
    row_expert = jnp.repeat(layout.block_expert, block)  # (R,): each row's expert (padding rows: any)
    if kind == "capacity":
        mm = lambda h, w: jnp.einsum("ECD,EDF->ECF", h.reshape(E, block, -1), w).reshape(E * block, -1)  # noqa: E731
    elif kind == "ragged":  # rows past the groups (a sentinel's, sorted last) come out 0
        mm = lambda h, w: jax.lax.ragged_dot(h, w, layout.counts[:E])  # noqa: E731
    elif kind == "split":
        mm = lambda h, w: split_matmul(h, w, packing, block)  # noqa: E731
        split_expert = jnp.concatenate(
            [jnp.repeat(jnp.arange(E, dtype=jnp.int32), block), jnp.repeat(packing.over_expert, OVERFLOW_BLOCK)]
        )
        row_expert = jnp.where(packing.fits, split_expert, jnp.repeat(packing.all_expert, OVERFLOW_BLOCK))
    else:
        mm = lambda h, w: grouped_matmul(  # noqa: E731
            h.reshape(nb, block, -1), w, layout.block_expert, layout.block_used
        ).reshape(nb * block, -1)
    bias = lambda y, b: y if b is None else y + b[row_expert]  # noqa: E731
    lora_in, lora_out = loras or (None, None)

    def lora(h, pair):  # each row's expert's scale · (h A_e) B_e, through the same grouped matmuls
        return 0.0 if pair is None else pair[2] * mm(mm(h, pair[0]), pair[1])

    if isinstance(w_in, (tuple, list)):  # gate and up as one (E, D, 2F) matmul: half the loop's steps, twice as wide
        F = w_in[0].shape[-1]
        h = bias(mm(rows, jnp.concatenate(w_in, axis=-1)), None if b_in is None else jnp.concatenate(b_in, -1))
        gate_lora, up_lora = lora_in or (None, None)
        gate, up = h[:, :F] + lora(rows, gate_lora), h[:, F:] + lora(rows, up_lora)
        h = gated_activation(gate, up, act=act, clamp=clamp, up_shift=up_shift)
    else:
        h = activation(act)(bias(mm(rows, w_in), b_in) + lora(rows, lora_in))
    return bias(mm(h, w_out), b_out) + lora(h, lora_out)
