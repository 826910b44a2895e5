"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), with settings per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm import kernels


def sample(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Draws one token per row.

    Args:
      key: one PRNG key (split into one per row), or (B, 2) one key per row: a row's draw then depends on
        its key and logits only, not on the other rows.
      logits: (B, V).
      temperature: 0 means greedy (argmax); otherwise logits are divided by it. Scalar or (B,).
      top_k: keep the k most likely tokens (0 = all). Scalar or (B,).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (Holtzman et al. 2019), after top-k; 1.0 = all. Scalar or (B,).

    Returns:
      (B,) int32 token ids.
    """
    static = [v for v in (temperature, top_k, top_p) if isinstance(v, (int, float))]
    if len(static) == 3 and (temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    logits = _apart(logits)
    B, V = logits.shape
    greedy = argmax(logits)
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        return greedy
    keys = jax.random.split(key, B) if key.ndim == 1 else key
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))

    def drawn(logits):
        logits = logits / jnp.where(t > 0, t, 1.0)[:, None]
        if not (isinstance(top_k, int) and top_k == 0 and isinstance(top_p, (int, float)) and top_p >= 1.0):
            k, p = jnp.broadcast_to(top_k, (B,)), jnp.broadcast_to(top_p, (B,))
            # Per-row settings are traced: sort the vocabulary only when some row filters.
            logits = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), lambda x: _filter(x, k, p), lambda x: x, logits)
        return jnp.where(t > 0, categorical(keys, logits), greedy)

    # A batch of greedy rows (the usual serving and evaluation case) draws nothing.
    return jax.lax.cond(jnp.any(t > 0), drawn, lambda _: greedy, logits)


def _apart(logits: jax.Array) -> jax.Array:
    """float32 logits behind an optimization barrier: XLA's CPU backend otherwise fuses the vocabulary
    reductions below into the read-out GEMM's library call, where a (16, 49,152) max took 3.4 ms, not 0.2."""
    return jax.lax.optimization_barrier(logits.astype(jnp.float32))


def argmax(logits: jax.Array) -> jax.Array:
    """(B, V) -> (B,) int32 index of each row's largest logit (the first, on ties): a max and a min reduction,
    4x faster than `jnp.argmax`'s (value, index) reduction on XLA's CPU (16 x 49,152: 0.5 against 1.8 ms)."""
    V = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1)  # a row of NaNs: the last index rather than one past the end


def categorical(keys: jax.Array, logits: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from softmax(logits), by inverse CDF: one uniform number per row against the
    cumulative probabilities, searched in two levels (blocks of `block` tokens, then within the block).

    `jax.random.categorical` (Gumbel-max) needs V random numbers a row; this needs one, and no length-V
    cumsum (16 rows x 49,152 tokens on this CPU: 0.4 ms against 8 ms). Tokens of probability 0 (logits at
    -inf or the float32 minimum) are never drawn.

    Args:
      keys: (B, 2) one PRNG key per row.
      logits: (B, V).

    Returns:
      (B,) int32 token ids.
    """
    B, V = logits.shape
    nb = -(-V // block)
    logits = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).reshape(B, nb, block)
    sums = weights.sum(-1)  # (B, nb)
    ends = jnp.cumsum(sums, axis=-1)
    u = 1.0 - jax.vmap(jax.random.uniform)(keys)  # in (0, 1]: a draw of 0 would pick a token of probability 0
    target = u * ends[:, -1]
    # The first block (then token) whose cumulative weight reaches the target; rounding can leave the last
    # cumulative sum just below it, so never past the last block (token) of non-zero weight.
    blk = jnp.minimum(jnp.sum(ends < target[:, None], -1), _last_positive(sums))
    before = jnp.take_along_axis(ends - sums, blk[:, None], 1)[:, 0]
    within = jnp.take_along_axis(weights, blk[:, None, None], 1)[:, 0]  # (B, block)
    idx = jnp.minimum(jnp.sum(jnp.cumsum(within, -1) + before[:, None] < target[:, None], -1), _last_positive(within))
    return (blk * block + idx).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    """(B, n) -> (B,) the index of each row's last positive entry."""
    n = x.shape[-1]
    return jnp.max(jnp.where(x > 0, jnp.arange(n), 0), axis=-1)


def distribution(
    logits: jax.Array, *, temperature: jax.Array | float, top_k: jax.Array | int, top_p: jax.Array | float
) -> jax.Array:
    """The distribution `sample` draws from: (B, V) logits -> (B, V) probabilities (one-hot argmax where
    temperature == 0). Settings are scalars or (B,)."""
    logits = _apart(logits)
    B, V = logits.shape
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    k, p = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,)), jnp.broadcast_to(jnp.asarray(top_p), (B,))
    scaled = logits / jnp.where(t > 0, t, 1.0)[:, None]
    # Sort the vocabulary only when some row filters.
    scaled = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), lambda x: _filter(x, k, p), lambda x: x, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    greedy = jax.nn.one_hot(argmax(logits), V, dtype=jnp.float32)
    return jnp.where((t > 0)[:, None], probs, greedy)


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """(B, V) logits with the tokens outside each row's top-k, then outside its top-p nucleus, at -inf-ish."""
    V = logits.shape[-1]
    neg = jnp.finfo(jnp.float32).min
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    ranked = jnp.where(jnp.arange(V)[None] < k[:, None], ranked, neg)  # top-k, as sorted
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]  # the mass before a token is below top_p
    keep &= jnp.arange(V)[None] < k[:, None]
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, neg, logits)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log-probabilities of `tokens` and the k most likely tokens under softmax(logits): the model's own
    distribution, before temperature, top-k or top-p (what scoring and evaluation need, as vLLM returns them).

    Args:
      logits: (..., V).
      tokens: (...) int, the token whose log-probability is wanted at each position.
      k: the alternatives listed (static).

    Returns:
      (...) float32 log p(token); (..., k) int32 ids of the k most likely tokens, most likely first, and
      (..., k) their float32 log-probabilities (taken from the same array, so a token that is also the most
      likely has the very same value in both).

    On CPU with the native kernels (`jaxlm.kernels`), one kernel reads each row of logits twice from cache; on
    other platforms XLA's logsumexp and top_k. Equal ids (an earlier token first among equal logits), values
    to float rounding.
    """
    lead, V = logits.shape[:-1], logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"token_logprobs: k={k} alternatives of a vocabulary of {V}")
    flat = logits.astype(jnp.float32).reshape(-1, V)
    ids = tokens.astype(jnp.int32).reshape(-1)

    def xla(flat, ids):
        # log p = logit - logsumexp, taken only where needed: no (M, V) array of log-probabilities is written
        lse = jax.nn.logsumexp(flat, axis=-1)
        chosen = jnp.take_along_axis(flat, jnp.clip(ids, 0, V - 1)[:, None], axis=-1)[:, 0] - lse  # as the kernel
        top, top_ids = jax.lax.top_k(flat, k)
        return chosen, top - lse[:, None], top_ids.astype(jnp.int32)

    def kernel(flat, ids):  # `jaxlm/kernels/token_logprobs.cc`
        M = flat.shape[0]
        out = (jax.ShapeDtypeStruct((M,), jnp.float32), jax.ShapeDtypeStruct((M, k), jnp.float32))
        out += (jax.ShapeDtypeStruct((M, k), jnp.int32),)
        return jax.ffi.ffi_call("jaxlm_token_logprobs", out, vmap_method="sequential")(flat, ids)

    chosen, top_lp, top_ids = kernels.cpu_or(kernel, xla, flat, ids)
    return chosen.reshape(lead), top_ids.reshape(*lead, k), top_lp.reshape(*lead, k)
