"""The learning side of PPO and GRPO: the policy's log-probs, entropy and values on rollouts, and their losses.

Rollout rows (`jaxlm.train.rl`) are right-padded prompt + response sequences (B, T); per-token arrays are
aligned with the next-token targets (B, T-1): `response` marks the targets that are response tokens, and a value
at t is the critic's estimate at the state that emits target t. Log-probs are those of the tempered policy
(logits / align.temperature), the distribution the rollouts were sampled from (as TRL computes them).

A loss is `loss(model, reference, batch, key, dropout_keys) -> (loss_sum, count, sums)` (see
`jaxlm.train.step.make_train_step`). PPO's count is response tokens, GRPO's is sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import AlignConfig
from jaxlm.ops.preference import token_entropy, token_logprobs
from jaxlm.ops.rl import gae, grpo_loss, kl_penalty, ppo_policy_loss, value_loss, whiten
from jaxlm.train.step import reference_model

ROLLOUT_FIELDS = ("tokens", "valid", "response")


def policy_outputs(model, tokens, valid, *, temperature: float, values: bool = False, dropout_keys=None):
    """(log-probs (B, T-1), entropies (B, T-1), values (B, T-1) or None) of `model` on (B, T) sequences."""
    x, _ = model.hidden(tokens[:, :-1], valid=valid[:, :-1], dropout_keys=dropout_keys)

    def stats(logits, targets):
        logits = logits / temperature
        return token_logprobs(logits, targets), token_entropy(logits)

    return (*model.readout(stats, x, tokens[:, 1:]), model.values(x) if values else None)


def make_scorer(graphdef, reference: str, temperature: float, values: bool):
    """score(params, frozen, ref, tokens, valid) -> (log-probs, reference log-probs, values or None): what a
    rollout needs from the policy before its updates (the caller jits it on the mesh)."""

    def score(params, frozen, ref, tokens, valid):
        model = nnx.merge(graphdef, params, frozen)
        logp, _, v = policy_outputs(model, tokens, valid, temperature=temperature, values=values)
        ref_model = reference_model(graphdef, params, frozen, ref, reference)
        ref_logp = policy_outputs(ref_model, tokens, valid, temperature=temperature)[0]
        return logp, ref_logp, v

    return score


def ppo_advantages(score, logp, ref_logp, values, response, ac: AlignConfig):
    """PPO's per-token rewards (−kl_coef·KL per token, plus the score at the last response token), GAE
    advantages (whitened) and returns. score (B,); the rest (B, T-1). Returns a dict of (B, T-1) arrays and the
    per-token KL estimates."""
    m = response.astype(jnp.float32)
    kl = kl_penalty(logp, ref_logp, ac.estimator("ppo")) * m
    last = jnp.max(jnp.where(response, jnp.arange(response.shape[1]), -1), axis=1)  # -1: no response token
    at_end = (jnp.arange(response.shape[1])[None] == last[:, None]) & response
    rewards = -ac.kl_coef * kl + jnp.where(at_end, score[:, None], 0.0)
    if ac.whiten_rewards:
        rewards = whiten(rewards, m, shift_mean=False)
    advantages, returns = gae(rewards, values, m, gamma=ac.gamma, lam=ac.lam)
    if ac.whiten_advantages:
        advantages = whiten(advantages, m)
    return {"advantages": advantages, "returns": returns, "rewards": rewards}, kl


def make_ppo_loss(ac: AlignConfig):
    def loss(model, reference, batch, key, dropout_keys=None):
        logp, entropy, values = policy_outputs(
            model, batch["tokens"], batch["valid"], temperature=ac.temperature, values=True, dropout_keys=dropout_keys
        )
        m = batch["response"]
        pg, clipped, approx_kl = ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], m, clip=ac.clip)
        vf, v_clipped = value_loss(values, batch["old_values"], batch["returns"], m, clip=ac.value_clip)
        sums = {
            "policy_loss": pg,
            "value_loss": vf,
            "clipfrac": clipped,
            "value_clipfrac": v_clipped,
            "approx_kl": approx_kl,
            "entropy": jnp.sum(entropy * m),
        }
        return pg + ac.vf_coef * vf, jnp.sum(m.astype(jnp.float32)), sums

    return loss


def make_grpo_loss(ac: AlignConfig):
    estimator = ac.estimator("grpo")

    def loss(model, reference, batch, key, dropout_keys=None):
        logp, entropy, _ = policy_outputs(
            model, batch["tokens"], batch["valid"], temperature=ac.temperature, dropout_keys=dropout_keys
        )
        m = batch["response"]
        total, kl, clipped = grpo_loss(
            logp,
            batch["old_logp"],
            batch["ref_logp"],
            batch["advantages"],
            m,
            clip=ac.clip,
            beta=ac.kl_coef,
            estimator=estimator,
        )
        tokens = jnp.maximum(jnp.sum(m, axis=1), 1)
        sums = {"kl": kl, "clipfrac": clipped, "entropy": jnp.sum(jnp.sum(entropy * m, axis=1) / tokens)}
        return total, jnp.asarray(m.shape[0], jnp.float32), sums

    return loss


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 − Var(returns − values) / Var(returns) over the masked tokens (1: the critic predicts the returns)."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    var = lambda x: jnp.sum(jnp.square(x - jnp.sum(x * m) / n) * m) / n  # noqa: E731
    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)
