"""Blockwise (flash-style) attention in pure JAX: memory linear in the sequence length.

Queries and keys are cut into blocks; for each query block an online softmax runs over the key blocks
(Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022), so no (T, S) score matrix exists, forward or
backward. The custom VJP keeps only the output and each row's log-sum-exp, and recomputes every tile's scores
in the backward pass (FlashAttention's algorithm 2), accumulating dK, dV per key block and dQ in place.

Masks come as a `MaskSpec` (positions, validity, segments, prefix, window) and biases as a `PositionBias`, and
each tile's mask and bias are built from them when it is computed. A tile no query of any row may attend (the
future of a causal block, outside a window, another packed example, empty cache slots) is skipped, forward and
backward: causal attention does about half the work of the reference.

Rows with no visible key return 0 (the reference returns the mean of v): they are padding queries. Attention
sinks join each row's softmax as its initial state (weight exp(sink - lse), no value).

Letters as in `jaxlm.ops.attention`; M = G * bq, the query rows of a block folded with their group (one GEMM
per kv head, as the reference lays them out on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlm.ops.masks import MaskSpec, PositionBias

_BIG = 2**30


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec,
    bias: PositionBias | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    sinks: jax.Array | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """softmax(cap(q·k^T * scale) + bias, masked) · v, one (query block, key block) tile at a time.

    Args:
      q: (B, T, N, H); k: (B, S, K, H); v: (B, S, K, Hv); N % K == 0.
      mask: the mask's inputs over (B, T) queries and (B, S) keys.
      bias: a bias as a function of the positions, or None.
      scale: defaults to 1/sqrt(H). softcap: > 0 bounds the scores to (-softcap, softcap).
      sinks: (N,) sink logits, or None.
      block_q, block_k: tile sizes (capped at T and S); T and S are padded up to multiples of them.

    Returns:
      (B, T, N, Hv) in q's dtype.
    """
    tiles = Tiles.of(q, k, mask=mask, bias=bias, scale=scale, softcap=softcap, block_q=block_q, block_k=block_k)
    params = () if bias is None else bias.params
    has_sinks = sinks is not None
    sinks = jnp.zeros((q.shape[2],), jnp.float32) if sinks is None else sinks

    @jax.custom_vjp
    def attention(q, k, v, params, sinks, mask):
        return attention_fwd(q, k, v, params, sinks, mask)[0]

    def attention_fwd(q, k, v, params, sinks, mask):
        out, lse = tiles.forward(q, k, v, params, mask)
        if has_sinks:
            out, lse = with_sinks(out, lse, sinks)
        out = out.astype(q.dtype)
        return out, (q, k, v, params, sinks, mask, out, lse)

    def attention_bwd(res, d_out):
        q, k, v, params, sinks, mask, out, lse = res
        delta = row_delta(d_out, out)
        dq, dk, dv, d_params = tiles.backward(q, k, v, params, mask, lse, delta, d_out)
        d_sinks = sink_grad(sinks, lse, delta) if has_sinks else None
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_params, d_sinks, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention(q, k, v, params, sinks, mask)


def with_sinks(out: jax.Array, lse: jax.Array, sinks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention sinks as one more softmax term with no value: out (B, T, N, Hv) and lse (B, T, N) rescaled."""
    total = jnp.logaddexp(lse, sinks.astype(jnp.float32))
    return out * jnp.exp(lse - total)[..., None], total


def sink_grad(sinks: jax.Array, lse: jax.Array, delta: jax.Array) -> jax.Array:
    """d loss / d sinks (N,): -sum over rows of p_sink * rowsum(dO * O)."""
    return -jnp.sum(jnp.exp(sinks.astype(jnp.float32) - lse) * delta, axis=(0, 1)).astype(sinks.dtype)


def row_delta(d_out: jax.Array, out: jax.Array) -> jax.Array:
    """rowsum(dO * O) (B, T, N), float32: the softmax's backward term of each query row."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def merge(out: jax.Array, lse: jax.Array, part: jax.Array, part_lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two normalised partial attentions over disjoint keys -> the attention over both (rows with no key in
    either: out 0, lse -inf). out, part: (B, T, N, Hv) float32; lse, part_lse: (B, T, N)."""
    m = jnp.maximum(lse, part_lse)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a, b = jnp.exp(lse - m), jnp.exp(part_lse - m)
    total = a + b
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = (out * a[..., None] + part * b[..., None]) / total[..., None]
    return jnp.where(seen[..., None], out, 0.0), jnp.where(seen, m + jnp.log(total), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How one attention call is cut into tiles, and its forward and backward passes over them (no sinks):
    the pieces `blockwise_attention` and ring attention (`jaxlm.parallel.context`) share."""

    shape: tuple  # B, T, S, N, K, G, H, Hv, bq, bk, nq, nk
    scale: float
    softcap: float
    bias_fn: Callable | None

    @staticmethod
    def of(q, k, *, mask, bias, scale, softcap, block_q, block_k) -> Tiles:
        B, T, N, H = q.shape
        _, S, K, _ = k.shape
        if N % K:
            raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
        if block_q < 1 or block_k < 1:
            raise ValueError(f"attention blocks must be positive, got block_q={block_q}, block_k={block_k}")
        if not isinstance(mask, MaskSpec):
            raise ValueError("blockwise attention takes its mask as a MaskSpec")
        bq, bk = min(block_q, T), min(block_k, S)
        shape = (B, T, S, N, K, N // K, H, None, bq, bk, -(-T // bq), -(-S // bk))
        return Tiles(shape, H**-0.5 if scale is None else scale, softcap, None if bias is None else bias.fn)

    def _blocked(self, q, k, v, mask):
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        Hv = v.shape[-1]
        qb = _pad(q, 1, nq * bq).reshape(B, nq, bq, K, G, H).transpose(1, 0, 3, 4, 2, 5).reshape(nq, B, K, G * bq, H)
        kb = _pad(k, 1, nk * bk).reshape(B, nk, bk, K, H).transpose(1, 0, 3, 2, 4)  # (nk, B, K, bk, H)
        vb = _pad(v, 1, nk * bk).reshape(B, nk, bk, K, Hv).transpose(1, 0, 3, 2, 4)
        return qb, kb, vb, padded_spec(mask, B, T, S, nq * bq, nk * bk)

    def _rows(self, x):
        """(B, T, N, ...) -> (nq, B, K, M, ...) as the blocked queries."""
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        x = _pad(x, 1, nq * bq)
        rest = x.shape[3:]
        x = x.reshape(B, nq, bq, K, G, *rest)
        return jnp.moveaxis(x, 2, 4).transpose(1, 0, 2, 3, 4, *range(5, 5 + len(rest))).reshape(nq, B, K, G * bq, *rest)

    def _unrows(self, x):
        """(nq, B, K, M, ...) -> (B, T, N, ...)."""
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        rest = x.shape[4:]
        x = x.reshape(nq, B, K, G, bq, *rest).transpose(1, 0, 4, 2, 3, *range(5, 5 + len(rest)))
        return x.reshape(B, nq * bq, N, *rest)[:, :T]

    def _post(self, raw, params, spec, i, j):
        """Soft-cap, bias and mask of tile (i, j)'s raw scores (a function of params, for their gradient)."""
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        t, s = jnp.arange(bq) + i * bq, jnp.arange(bk) + j * bk
        scores = self.softcap * jnp.tanh(raw / self.softcap) if self.softcap else raw
        if self.bias_fn is not None:
            b = self.bias_fn(params, spec.q_positions[:, t], spec.kv_positions[:, s]).astype(jnp.float32)
            scores = scores + _fold(b, K, G, bq)
        allowed = _fold(spec.tile(t, s)[:, None], K, G, bq)
        return jnp.where(allowed, scores, -jnp.inf)

    def _raw(self, qi, kj):
        return jnp.einsum("BKMH,BKSH->BKMS", qi, kj, preferred_element_type=jnp.float32) * self.scale

    def forward(self, q, k, v, params, mask) -> tuple[jax.Array, jax.Array]:
        """(out (B, T, N, Hv) float32, lse (B, T, N)): the attention of q over these keys; rows with no visible
        key give out 0 and lse -inf."""
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        Hv = v.shape[-1]
        qb, kb, vb, spec = self._blocked(q, k, v, mask)
        live = _live(spec, nq, nk)

        def query_block(i):
            qi = qb[i]

            def key_block(carry, j):
                def update(carry):
                    m, total, acc = carry
                    s = self._post(self._raw(qi, kb[j]), params, spec, i, j)
                    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all masked so far: no shift
                    p = jnp.exp(s - m_safe[..., None])
                    correction = jnp.exp(m - m_safe)
                    pv = jnp.einsum("BKMS,BKSH->BKMH", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                    return m_new, total * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

                return jax.lax.cond(live[i, j], update, lambda c: c, carry), None

            # The carries start from the inputs' zeros, so that they vary over a shard_map's axes as q does.
            zero = jnp.zeros_like(qi[..., 0], jnp.float32)
            init = (zero - jnp.inf, zero, zero[..., None] + jnp.zeros((Hv,)))
            (m, total, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nk))
            seen = total > 0
            total = jnp.where(seen, total, 1.0)
            out = jnp.where(seen[..., None], acc / total[..., None], 0.0)
            return out, jnp.where(seen, m + jnp.log(total), -jnp.inf)

        out, lse = jax.lax.map(query_block, jnp.arange(nq))
        return self._unrows(out), self._unrows(lse)

    def backward(self, q, k, v, params, mask, lse, delta, d_out):
        """(dq, dk, dv float32, d params) of the attention over these keys, given each row's log-sum-exp over
        all its keys (B, T, N), `row_delta` of the whole output and its cotangent d_out (B, T, N, Hv)."""
        B, T, S, N, K, G, H, _, bq, bk, nq, nk = self.shape
        qb, kb, vb, spec = self._blocked(q, k, v, mask)
        live = _live(spec, nq, nk)
        lse = self._rows(jnp.where(jnp.isfinite(lse), lse, jnp.inf))  # no key: every p = 0
        delta, d_out = self._rows(delta), self._rows(d_out.astype(jnp.float32))
        zeros_like = lambda t: jax.tree.map(lambda a: jnp.zeros_like(a, jnp.float32), t)  # noqa: E731

        def key_block(carry, j):
            dq, d_params = carry
            kj, vj = kb[j], vb[j]

            def query_block(c, i):
                def grads(c):
                    dk, dv, dq, d_params = c
                    qi, do = qb[i], d_out[i]
                    s, post_vjp = jax.vjp(lambda r, p: self._post(r, p, spec, i, j), self._raw(qi, kj), params)
                    p = jnp.exp(s - lse[i][..., None])
                    dv = dv + jnp.einsum("BKMS,BKMH->BKSH", p, do)
                    dp = jnp.einsum("BKMH,BKSH->BKMS", do, vj, preferred_element_type=jnp.float32)
                    d_raw, d_p = post_vjp(p * (dp - delta[i][..., None]))
                    d_raw = d_raw * self.scale
                    dq = dq.at[i].add(jnp.einsum("BKMS,BKSH->BKMH", d_raw, kj, preferred_element_type=jnp.float32))
                    dk = dk + jnp.einsum("BKMS,BKMH->BKSH", d_raw, qi, preferred_element_type=jnp.float32)
                    d_params = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_params, d_p)
                    return dk, dv, dq, d_params

                return jax.lax.cond(live[i, j], grads, lambda c: c, c), None

            init = (zeros_like(kj), zeros_like(vj), dq, d_params)
            (dk, dv, dq, d_params), _ = jax.lax.scan(query_block, init, jnp.arange(nq))
            return (dq, d_params), (dk, dv)

        init = (zeros_like(qb), zeros_like(params))
        (dq, d_params), (dk, dv) = jax.lax.scan(key_block, init, jnp.arange(nk))
        unkeys = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, -1)[:, :S]  # noqa: E731
        d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, params)
        return self._unrows(dq), unkeys(dk), unkeys(dv), d_params


def _pad(x: jax.Array, axis: int, size: int, value=0, mode: str = "constant") -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode) if mode == "edge" else jnp.pad(x, widths, constant_values=value)


def padded_spec(m: MaskSpec, B: int, T: int, S: int, Tp: int, Sp: int) -> MaskSpec:
    """The spec with every array (B, T) / (B, S) made explicit and padded to Tp / Sp: padded keys are invalid,
    padded queries repeat the last query (so they widen no block's range)."""
    full = lambda a, n: jnp.broadcast_to(a, (B, n))  # noqa: E731
    qa = lambda a: None if a is None else _pad(full(a, T), 1, Tp, mode="edge")  # noqa: E731
    ka = lambda a: None if a is None else _pad(full(a, S), 1, Sp, mode="edge")  # noqa: E731
    valid = jnp.ones((B, S), bool) if m.kv_valid is None else full(m.kv_valid, S)
    return MaskSpec(
        q_positions=qa(m.q_positions).astype(jnp.int32),
        kv_positions=ka(m.kv_positions).astype(jnp.int32),
        kv_valid=_pad(valid, 1, Sp, value=False),
        q_segments=qa(m.q_segments),
        kv_segments=ka(m.kv_segments),
        q_prefix=qa(m.q_prefix),
        kv_prefix=ka(m.kv_prefix),
        window=None if m.window is None else jnp.asarray(m.window, jnp.int32),
        causal=m.causal,
    )


def _live(spec: MaskSpec, nq: int, nk: int) -> jax.Array:
    """(nq, nk) bool: False where no query of block i in any row may attend to any key of block j (a
    conservative test from each block's position and segment ranges: a live tile may still be all masked)."""
    B = spec.q_positions.shape[0]
    blocks = lambda a, n: a.reshape(B, n, -1)  # noqa: E731
    valid = blocks(spec.kv_valid, nk)
    lo = lambda a, ok=None: jnp.min(a if ok is None else jnp.where(ok, a, _BIG), axis=-1)  # noqa: E731
    hi = lambda a, ok=None: jnp.max(a if ok is None else jnp.where(ok, a, -_BIG), axis=-1)  # noqa: E731
    qpos, kpos = blocks(spec.q_positions, nq), blocks(spec.kv_positions, nk)
    q_lo, q_hi = lo(qpos)[:, :, None], hi(qpos)[:, :, None]  # (B, nq, 1)
    k_lo, k_hi = lo(kpos, valid)[:, None], hi(kpos, valid)[:, None]  # (B, 1, nk)
    live = jnp.any(valid, axis=-1)[:, None]
    if spec.causal:
        seen = k_lo <= q_hi
        if spec.q_prefix is not None:
            q_pre = jnp.any(blocks(spec.q_prefix, nq), axis=-1)[:, :, None]
            seen |= q_pre & jnp.any(blocks(spec.kv_prefix, nk) & valid, axis=-1)[:, None]
        live &= seen
    if spec.window is not None:
        live &= k_hi > q_lo - spec.window
        if not spec.causal:
            live &= k_lo < q_hi + spec.window
    if spec.q_segments is not None:
        qs, ks = blocks(spec.q_segments, nq), blocks(spec.kv_segments, nk)
        live &= (lo(ks, valid)[:, None] <= hi(qs)[:, :, None]) & (hi(ks, valid)[:, None] >= lo(qs)[:, :, None])
    return jnp.broadcast_to(jnp.any(live, axis=0), (nq, nk))


def _fold(x: jax.Array, K: int, G: int, bq: int) -> jax.Array:
    """(b, n, bq, bk) with n in {1, N} -> (b, k, G*bq, bk) as a tile's folded scores (k = 1 when n = 1)."""
    b, n, t, s = x.shape
    x = x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, K, G, t, s)
    x = jnp.broadcast_to(x, (b, x.shape[1], G, t, s))
    return x.reshape(b, x.shape[1], G * bq, s)
