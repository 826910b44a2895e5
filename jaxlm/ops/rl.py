"""Policy-gradient pieces of RLHF: the KL penalty to a reference, GAE, advantage whitening, PPO's clipped
policy and value losses, and GRPO's group-relative advantages.

PPO: Schulman et al. 2017, as used for language models by Ziegler et al. 2019 and InstructGPT (per-token KL
penalty in the reward, value head, GAE); the code follows TRL's `PPOTrainer`. GRPO: Shao et al. 2024
(DeepSeekMath), advantages normalized within the group of samples of one prompt, KL added to the loss; the
code follows TRL's `GRPOTrainer`. Shapes: B rollouts, T response positions; `mask` marks real response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman 2020, "Approximating KL
    divergence"): (B, T) -> (B, T).

    k1 = log π − log π_ref (unbiased, can be negative; PPO's reward penalty), k2 = ½(log π − log π_ref)²,
    k3 = π_ref/π − 1 − log(π_ref/π) (unbiased and ≥ 0; GRPO's loss term).
    """
    d = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    if estimator == "k3":
        return jnp.exp(-d) + d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; choose from {list(KL_ESTIMATORS)}")


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL's `masked_whiten`); masked-out
    entries come back as 0. shift_mean=False keeps the mean (rewards are scaled, not centred)."""
    mask = mask.astype(jnp.float32)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's response.

    rewards, values: (B, T) per-token rewards and value estimates; mask: (B, T), real tokens first (the
    episode ends after the last one: no bootstrapping from padding).

    Returns:
      (advantages, returns), (B, T) float32, zero where `mask` is 0; returns = advantages + values.
    """
    mask = mask.astype(jnp.float32)
    r, v = rewards.astype(jnp.float32) * mask, values.astype(jnp.float32) * mask
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)

    def back(carry, x):  # one position, from the last to the first
        delta, m = x
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    deltas = r + gamma * next_v - v
    _, adv = jax.lax.scan(back, jnp.zeros(r.shape[0]), (deltas.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * mask


def ppo_policy_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *, clip: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's clipped surrogate per token: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = π/π_old.

    Returns (loss_sum, clipped_count, approx_kl_sum) over the masked tokens: the caller divides by the token
    count (summed over micro-batches and devices). approx_kl is ½(log ρ)², TRL's `approxkl`.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    clipped = (loss2 > loss1).astype(jnp.float32)
    return (
        jnp.sum(jnp.maximum(loss1, loss2) * mask),
        jnp.sum(clipped * mask),
        jnp.sum(0.5 * jnp.square(log_ratio) * mask),
    )


def value_loss(
    values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, clip: float
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped value loss per token, ½·max((V − R)², (clip(V, V_old ± ε) − R)²).

    Returns (loss_sum, clipped_count) over the masked tokens."""
    mask = mask.astype(jnp.float32)
    values = values.astype(jnp.float32)
    clipped_v = jnp.clip(values, old_values - clip, old_values + clip)
    l1, l2 = jnp.square(values - returns), jnp.square(clipped_v - returns)
    return jnp.sum(0.5 * jnp.maximum(l1, l2) * mask), jnp.sum((l2 > l1).astype(jnp.float32) * mask)


def group_advantages(rewards: jax.Array, group: int, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """GRPO: each sample's reward minus its group's mean, over the group's std (unbiased) + eps when `scale`.

    rewards: (B,) with B = prompts · group, the samples of one prompt adjacent. Returns (B,) float32; a group
    whose rewards are all equal gets 0 advantage.
    """
    r = rewards.astype(jnp.float32).reshape(-1, group)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / max(group - 1, 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip: float,
    beta: float,
    estimator: str = "k3",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GRPO's per-token loss −min(ρ·A, clip(ρ)·A) + β·KL(π, π_ref), averaged over each sequence's tokens; the KL
    per token is `kl_penalty`'s estimator (k3, as DeepSeekMath and TRL).

    advantages: (B,) one per sample, shared by its tokens. ref_logp: None when β = 0.

    Returns (loss_sum, kl_sum, clip_sum) over sequences, each sequence's term the mean over its tokens (of the
    loss, the k3 KL, the clipped indicator); the caller divides by the number of sequences.
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp.astype(jnp.float32) - old_logp.astype(jnp.float32))
    a = advantages.astype(jnp.float32)[:, None]
    l1, l2 = ratio * a, jnp.clip(ratio, 1 - clip, 1 + clip) * a
    per_token = -jnp.minimum(l1, l2)
    kl = jnp.zeros_like(per_token) if ref_logp is None else kl_penalty(logp, ref_logp, estimator)
    if beta:
        per_token = per_token + beta * kl
    tokens = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    mean = lambda x: jnp.sum(jnp.sum(x * mask, axis=1) / tokens)  # noqa: E731
    return mean(per_token), mean(kl), mean((l2 < l1).astype(jnp.float32))
