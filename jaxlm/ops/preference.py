"""Losses of learning from preference pairs: the reward model's Bradley–Terry loss and DPO with its variants.

Bradley–Terry (InstructGPT, Ouyang et al. 2022): P(chosen ≻ rejected) = σ(r_c − r_r), loss −log σ(r_c − r_r).
DPO (Rafailov et al. 2023): the policy's implicit reward is β·log π/π_ref; loss −log σ(β·(Δ_c − Δ_r)) with
Δ = log π(y|x) − log π_ref(y|x). Conservative DPO (Mitchell 2023) assumes labels flipped with probability ε;
robust DPO (Chowdhury et al. 2024) is its unbiased form; IPO (Azar et al. 2023) regresses the per-token
log-ratio margin to 1/(2β). The formulas follow TRL's `DPOTrainer` and `RewardTrainer`, which the tests
compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position: (B, T, V) logits, (B, T) ids -> (B, T) float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of each position's next-token distribution (nats): (B, T, V) -> (B, T) float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def last_token(x: jax.Array, valid: jax.Array) -> jax.Array:
    """x at each row's last valid position: (B, T, ...) and (B, T) bool -> (B, ...).

    The reward model's score of a sequence is its value at the last real token (as transformers'
    `...ForSequenceClassification` pools); a row without valid tokens gives position 0.
    """
    T = valid.shape[1]
    last = jnp.max(jnp.where(valid, jnp.arange(T), 0), axis=1)
    return jnp.take_along_axis(x, last.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


def bradley_terry(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | float = 0.0) -> jax.Array:
    """Per-pair loss −log σ(r_c − r_r − margin) (Llama 2's margin; 0 = InstructGPT): (P,) -> (P,) float32."""
    return -jax.nn.log_sigmoid(chosen.astype(jnp.float32) - rejected.astype(jnp.float32) - margin)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: jax.Array | None = None,
    rejected_tokens: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO losses and the implicit rewards β·Δ_c and β·Δ_r.

    Args:
      policy_chosen, policy_rejected, ref_chosen, ref_rejected: (P,) summed log-probs of each completion under
        the policy and the reference.
      beta: β, the strength of the pull towards the reference (IPO: τ).
      loss: sigmoid (DPO; with label_smoothing ε > 0 conservative DPO) | robust (unbiased under flip rate ε)
        | ipo | hinge (SLiC).
      label_smoothing: ε in [0, 0.5).
      chosen_tokens, rejected_tokens: (P,) completion lengths; IPO averages the log-ratios per token.

    Returns:
      (losses, chosen_rewards, rejected_rewards), each (P,) float32.
    """
    f = lambda x: x.astype(jnp.float32)  # noqa: E731
    chosen_ratio = f(policy_chosen) - f(ref_chosen)
    rejected_ratio = f(policy_rejected) - f(ref_rejected)
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif loss == "robust":
        clean = -(1 - eps) * jax.nn.log_sigmoid(beta * delta)
        flipped = -eps * jax.nn.log_sigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * eps)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages per token: pass chosen_tokens and rejected_tokens")
        per_token = chosen_ratio / jnp.maximum(f(chosen_tokens), 1.0) - rejected_ratio / jnp.maximum(
            f(rejected_tokens), 1.0
        )
        losses = jnp.square(per_token - 1 / (2 * beta))
    elif loss == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; choose from {list(DPO_LOSSES)}")
    return losses, beta * chosen_ratio, beta * rejected_ratio
