"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), with settings per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        return greedy
    keys = jax.random.split(key, B) if key.ndim == 1 else key
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    logits = logits / jnp.where(t > 0, t, 1.0)[:, None]
    if not (isinstance(top_k, int) and top_k == 0 and isinstance(top_p, (int, float)) and top_p >= 1.0):
        k, p = jnp.broadcast_to(top_k, (B,)), jnp.broadcast_to(top_p, (B,))
        # Per-row settings are traced: sort the vocabulary only when some row filters.
        logits = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), lambda x: _filter(x, k, p), lambda x: x, logits)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, logits).astype(jnp.int32)
    return jnp.where(t > 0, drawn, greedy)


def distribution(
    logits: jax.Array, *, temperature: jax.Array | float, top_k: jax.Array | int, top_p: jax.Array | float
) -> jax.Array:
    """The distribution `sample` draws from: (B, V) logits -> (B, V) probabilities (one-hot argmax where
    temperature == 0). Settings are scalars or (B,)."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    k, p = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,)), jnp.broadcast_to(jnp.asarray(top_p), (B,))
    scaled = logits / jnp.where(t > 0, t, 1.0)[:, None]
    # Sort the vocabulary only when some row filters.
    scaled = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), lambda x: _filter(x, k, p), lambda x: x, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
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
