"""The losses of training on preference pairs: a reward model (Bradley–Terry) and a policy (DPO).

A loss is `loss(model, reference, batch, key, dropout_keys) -> (loss_sum, count, sums)` (see
`jaxlm.train.step.make_train_step`): summed per-pair losses, the number of real pairs, and metric sums that
the step divides by the count. Batches hold (P, 2, T) rows from `jaxlm.data.preferences.pair_rows`; pairs that
pad a batch (no valid token) count for nothing. The metrics are those TRL's trainers log.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import AlignConfig
from jaxlm.nn.moe import router_stats
from jaxlm.ops.preference import bradley_terry, dpo_loss, last_token, token_logprobs


def _flat(x: jax.Array) -> jax.Array:
    """(P, 2, ...) -> (2P, ...): rows chosen_0, rejected_0, chosen_1, ... (each device keeps its own pairs)."""
    return x.reshape(-1, *x.shape[2:])


def _pair_keys(dropout_keys):
    """One dropout key per pair -> the same key for its chosen and rejected rows."""
    return None if dropout_keys is None else jnp.repeat(dropout_keys, 2, axis=0)


def sequence_logprobs(model, batch: dict, dropout_keys=None) -> tuple[jax.Array, jax.Array]:
    """(log π(completion | prompt), completion tokens), each (P, 2), of a pair batch under `model`."""
    tokens, valid, mask = _flat(batch["tokens"]), _flat(batch["valid"]), _flat(batch["mask"])
    x, _ = model.hidden(tokens[:, :-1], valid=valid[:, :-1], dropout_keys=_pair_keys(dropout_keys))
    scored = mask[:, 1:].astype(jnp.float32)
    logp = jnp.sum(model.readout(token_logprobs, x, tokens[:, 1:]) * scored, axis=-1)
    return logp.reshape(-1, 2), jnp.sum(scored, axis=-1).reshape(-1, 2)


def reward_scores(model, tokens: jax.Array, valid: jax.Array, dropout_keys=None) -> jax.Array:
    """A reward model's score of each sequence, at its last valid token: (B, T) -> (B,) float32."""
    scores, _ = model(tokens, valid=valid, dropout_keys=dropout_keys)
    return last_token(scores[..., 0], valid)


def make_reward_loss(ac: AlignConfig):
    def loss(model, reference, batch, key, dropout_keys=None):
        valid = batch["valid"]
        scores = reward_scores(model, _flat(batch["tokens"]), _flat(valid), _pair_keys(dropout_keys)).reshape(-1, 2)
        chosen, rejected = scores[:, 0], scores[:, 1]
        real = valid[:, 0, 0].astype(jnp.float32)
        sums = {
            "accuracy": jnp.sum((chosen > rejected) * real),
            "margin": jnp.sum((chosen - rejected) * real),
            "reward_chosen": jnp.sum(chosen * real),
            "reward_rejected": jnp.sum(rejected * real),
        }
        return jnp.sum(bradley_terry(chosen, rejected, ac.reward_margin) * real), jnp.sum(real), sums

    return loss


def make_dpo_loss(ac: AlignConfig):
    def loss(model, reference, batch, key, dropout_keys=None):
        logp, tokens = sequence_logprobs(model, batch, dropout_keys)
        with router_stats():  # the frozen reference's routers are not the policy's: their statistics stay out
            ref_logp = jax.lax.stop_gradient(sequence_logprobs(reference, batch)[0])
        losses, chosen, rejected = dpo_loss(
            logp[:, 0],
            logp[:, 1],
            ref_logp[:, 0],
            ref_logp[:, 1],
            beta=ac.beta,
            loss=ac.dpo_loss,
            label_smoothing=ac.label_smoothing,
            chosen_tokens=tokens[:, 0],
            rejected_tokens=tokens[:, 1],
        )
        real = batch["valid"][:, 0, 0].astype(jnp.float32)
        sums = {
            "rewards/chosen": jnp.sum(chosen * real),
            "rewards/rejected": jnp.sum(rejected * real),
            "rewards/accuracies": jnp.sum((chosen > rejected) * real),
            "rewards/margins": jnp.sum((chosen - rejected) * real),
            # How often the policy itself gives the chosen completion the higher log-probability (defined before
            # training too, unlike the implicit rewards, which start at zero).
            "logps/accuracies": jnp.sum((logp[:, 0] > logp[:, 1]) * real),
            "logps/chosen": jnp.sum(logp[:, 0] * real),
            "logps/rejected": jnp.sum(logp[:, 1] * real),
        }
        return jnp.sum(losses * real), jnp.sum(real), sums

    return loss
