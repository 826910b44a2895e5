"""Input corruption for denoising objectives, as pure functions of a PRNG key.

BERT's masked-language-model corruption (Devlin et al. 2019): pick `rate` of
the tokens as targets; of those, 80% become [MASK], 10% a random token and 10%
stay unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mlm_corrupt(
    key: jax.Array,
    tokens: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Corrupts (B, T) int tokens; returns (corrupted tokens, (B, T) bool: positions to predict).

    Padding (valid False) is never picked. Random replacements are drawn from the whole vocabulary.
    """
    k_pick, k_how, k_rand = jax.random.split(key, 3)
    picked = jax.random.uniform(k_pick, tokens.shape) < rate
    if valid is not None:
        picked &= valid
    how = jax.random.uniform(k_how, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, tokens.dtype)
    out = jnp.where(picked & (how < 0.8), mask_id, tokens)
    out = jnp.where(picked & (how >= 0.8) & (how < 0.9), random_tokens, out)
    return out, picked
