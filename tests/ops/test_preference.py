"""Preference losses against TRL's trainers (their loss code run on the same log-probs) and invariants."""

import math
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops.preference import bradley_terry, dpo_loss, last_token, token_entropy, token_logprobs
from tests.parity import require


def _pairs(seed=0, P=6, T=9):
    rng = np.random.default_rng(seed)
    logp = lambda: rng.normal(-1.5, 0.7, size=(P, T)).astype(np.float32)  # noqa: E731
    mask = np.zeros((2 * P, T), np.float32)
    for i in range(2 * P):  # completions of different lengths
        mask[i, rng.integers(1, 3) : rng.integers(5, T + 1)] = 1
    return logp(), logp(), logp(), logp(), mask


class _Accelerator:
    device = "cpu"

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_stub(torch, **attrs):
    """`self` of a TRL trainer with only what its loss code reads."""
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _trl_dpo(torch, pc, pr, rc, rr, mask, *, loss_type, beta, label_smoothing):
    """TRL DPOTrainer._compute_loss on fixed per-token log-probs (a stub model returns them)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token = torch.tensor(np.concatenate([pc, pr]))  # (2P, T): batch is [chosen, rejected]
    full_mask = torch.tensor(np.pad(mask, ((0, 0), (1, 0))))  # completion_mask covers input_ids (T + 1)
    token_logps = per_token * full_mask[:, 1:]

    def model(**kwargs):
        n = per_token.shape
        return types.SimpleNamespace(
            log_probs=token_logps,
            entropy=torch.zeros(n),
            mean_logits=torch.zeros(n),
            is_top1=torch.zeros(n, dtype=torch.bool),
        )

    P = len(pc)
    inputs = {
        "input_ids": torch.zeros(full_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(full_mask.shape, dtype=torch.long),
        "completion_mask": full_mask.long(),
        "ref_chosen_logps": torch.tensor((rc * mask[:P]).sum(1)),
        "ref_rejected_logps": torch.tensor((rr * mask[P:]).sum(1)),
    }
    stub = _trl_stub(
        torch,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _ours(pc, pr, rc, rr, mask, **kw):
    P = len(pc)
    s = lambda x, m: jnp.sum(jnp.asarray(x) * m, axis=1)  # noqa: E731
    cm, rm = mask[:P], mask[P:]
    losses, c, r = dpo_loss(
        s(pc, cm), s(pr, rm), s(rc, cm), s(rr, rm), chosen_tokens=cm.sum(1), rejected_tokens=rm.sum(1), **kw
    )
    return losses, c, r


@pytest.mark.parametrize(
    "loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2), ("ipo", 0.1, 0.0)]
)
def test_dpo_equals_trl(loss, beta, eps):
    torch = require("torch")
    require("trl")
    pc, pr, rc, rr, mask = _pairs()
    want, metrics = _trl_dpo(torch, pc, pr, rc, rr, mask, loss_type=loss, beta=beta, label_smoothing=eps)
    losses, c, r = _ours(pc, pr, rc, rr, mask, beta=beta, loss=loss, label_smoothing=eps)
    np.testing.assert_allclose(float(jnp.mean(losses)), want, rtol=1e-6, atol=1e-6)
    # The metrics TRL logs.
    np.testing.assert_allclose(float(jnp.mean(c)), metrics["rewards/chosen"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(r)), metrics["rewards/rejected"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(jnp.mean(c - r)), metrics["rewards/margins"], rtol=1e-6, atol=1e-6)
    assert float(jnp.mean(c > r)) == pytest.approx(metrics["rewards/accuracies"])


def test_conservative_dpo_equals_trl():
    """cDPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ). TRL 1.x writes it in its `aot_unpaired` loss, whose sort over the
    batch is the identity for a single pair: compared pair by pair."""
    torch = require("torch")
    require("trl")
    pc, pr, rc, rr, mask = _pairs(seed=1)
    losses, *_ = _ours(pc, pr, rc, rr, mask, beta=0.3, loss="sigmoid", label_smoothing=0.15)
    P = len(pc)
    for i in range(P):
        one = lambda x, i=i: x[i : i + 1]  # noqa: E731
        m = np.concatenate([mask[i : i + 1], mask[P + i : P + i + 1]])
        want, _ = _trl_dpo(
            torch, one(pc), one(pr), one(rc), one(rr), m, loss_type="aot_unpaired", beta=0.3, label_smoothing=0.15
        )
        np.testing.assert_allclose(float(losses[i]), want, rtol=1e-6, atol=1e-6)


def test_bradley_terry_equals_trl():
    torch = require("torch")
    require("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2 * 5, 1)).astype(np.float32)  # [chosen; rejected]
    model = lambda **kw: types.SimpleNamespace(logits=torch.tensor(scores))  # noqa: E731
    stub = _trl_stub(torch, args=types.SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.zeros((10, 4), dtype=torch.long), "attention_mask": torch.ones((10, 4))}
    want = float(RewardTrainer.compute_loss(stub, model, inputs))
    ours = bradley_terry(jnp.asarray(scores[:5, 0]), jnp.asarray(scores[5:, 0]))
    np.testing.assert_allclose(float(jnp.mean(ours)), want, rtol=1e-6, atol=1e-6)
    c, r = scores[:5, 0], scores[5:, 0]
    assert float(np.mean(c > r)) == pytest.approx(stub._metrics["train"]["accuracy"][-1])
    np.testing.assert_allclose(float(np.mean(c - r)), stub._metrics["train"]["margin"][-1], rtol=1e-6)


def test_policy_equal_to_reference_gives_log2():
    pc, pr, _, _, mask = _pairs(seed=3)
    for loss in ("sigmoid", "robust"):
        losses, c, r = _ours(pc, pr, pc, pr, mask, beta=0.1, loss=loss, label_smoothing=0.1)
        np.testing.assert_allclose(np.asarray(losses), math.log(2), rtol=1e-6)
        assert not np.any(np.asarray(c)) and not np.any(np.asarray(r))


def test_dpo_gradient_raises_chosen_lowers_rejected():
    g = jax.grad(lambda x: dpo_loss(x[0:1], x[1:2], jnp.zeros(1), jnp.zeros(1), beta=0.1)[0].sum())(jnp.zeros(2))
    assert g[0] < 0 < g[1]  # descending the loss raises log π(chosen) and lowers log π(rejected)


def test_dpo_refuses_unknown_loss_and_ipo_without_lengths():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(x, x, x, x, beta=0.1, loss="kto")
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(x, x, x, x, beta=0.1, loss="ipo")


def test_token_logprobs_entropy_and_last_token():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        token_logprobs(jnp.asarray(logits), jnp.asarray(targets)),
        np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(token_entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(last_token(jnp.asarray(logits), jnp.asarray(valid)), logits[[0, 1], [2, 4]])
