"""Multi-LoRA serving: LoRA banks on one base, each row of a continuous batch using its own adapter (or none);
every row equals the engine over that adapter alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import PeftConfig
from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.nn.adapters import LoRABank, select_adapters
from jaxlm.ops.lora import lora_bank_delta, lora_delta
from jaxlm.peft import apply_peft, attach_lora_banks, loras, take_loras
from tests.test_generate import model_for

ADAPTERS = [
    PeftConfig(method="lora", rank=4, alpha=8.0, targets=("q", "v", "down", "embed")),
    PeftConfig(method="lora", rank=8, alpha=4.0, rslora=True, targets=("q", "k", "o", "gate", "up", "lm_head")),
]


def adapted(pc: PeftConfig, seed: int):
    """The base model (the same weights every call) with LoRA `pc`, its B (zero at init) random too."""
    model = model_for("llama_tiny", max_seq_len=48, tie_embeddings=False)
    apply_peft(model, pc, seed=seed)
    for i, (*_, lora) in enumerate(loras(model)):
        lora.b.set_value(0.3 * jax.random.normal(jax.random.PRNGKey(100 * seed + i), lora.b.shape))
        if isinstance(lora.a[...], jax.Array) and not jnp.any(lora.a[...]):  # the embedding's A starts at zero
            lora.a.set_value(0.3 * jax.random.normal(jax.random.PRNGKey(7 + i), lora.a.shape))
    return model


def banked():
    base = model_for("llama_tiny", max_seq_len=48, tie_embeddings=False)
    attach_lora_banks(base, [take_loras(adapted(pc, i + 1)) for i, pc in enumerate(ADAPTERS)])
    return base


def run(steps, requests, **engine):
    e = Engine(steps, **engine)
    for r in requests:
        e.submit(r)
    e.run()
    return [(r.tokens, r.token_logprobs) for r in requests]


def test_bank_delta_is_each_rows_own_lora():
    """The op alone: rows with adapter 1, 2 or none get scale·(x·A)·B of their own (zero-padded ranks)."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (3, 5, 16))
    a1, b1 = jax.random.normal(k[1], (16, 2)), jax.random.normal(k[2], (2, 4, 3))
    a2, b2 = jax.random.normal(k[3], (16, 4)), jax.random.normal(k[4], (4, 4, 3))
    a = jnp.stack([jnp.pad(a1, ((0, 0), (0, 2))), a2], axis=1)  # (I, M, R)
    b = jnp.stack([jnp.pad(b1, ((0, 2), (0, 0), (0, 0))), b2])
    rows = jax.nn.one_hot(jnp.array([1, -1, 0]), 2)  # adapter 2, none, adapter 1
    got = lora_bank_delta(x, a, b, jnp.array([0.5, 2.0]), rows)
    np.testing.assert_allclose(got[0], lora_delta(x[:1], a2, b2, 2.0)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_allclose(got[2], lora_delta(x[2:], a1, b1, 0.5)[0], rtol=1e-5, atol=1e-5)


def test_each_row_equals_its_adapter_served_alone():
    """A continuous batch of the base and both adapters (mixed prompt lengths, chunked prefill, more requests
    than slots): each request's tokens and log-probabilities equal those of the engine over the model with
    only its adapter (or none)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 128, n).tolist() for n in (3, 19, 7, 33, 1, 12)]
    which = [0, 1, 2, 2, 1, 0]
    mixed = [Request(p, 12, temperature=0.0, logprobs=2, adapter=a) for p, a in zip(prompts, which)]
    steps = DecodeSteps(banked())
    assert steps.adapters == 2
    got = run(steps, mixed, slots=2, chunk=8)
    alone = [DecodeSteps(model_for("llama_tiny", max_seq_len=48, tie_embeddings=False))]
    alone += [DecodeSteps(adapted(pc, i + 1)) for i, pc in enumerate(ADAPTERS)]
    for p, a, (tokens, lps) in zip(prompts, which, got):
        want_tokens, want_lps = run(alone[a], [Request(p, 12, temperature=0.0, logprobs=2)], slots=1, chunk=8)[0]
        assert tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, atol=1e-4)
        if a:  # the adapter changes what is written: the base alone writes something else
            assert tokens != run(alone[0], [Request(p, 12, temperature=0.0)], slots=1, chunk=8)[0][0]


def test_prefix_cache_keeps_adapters_apart():
    """The same prompt under two adapters: the second does not reuse the first's cached blocks (other K/V)."""
    steps = DecodeSteps(banked())
    prompt = list(range(1, 40))
    e = Engine(steps, slots=2, chunk=8)
    first = e.submit(Request(prompt, 4, temperature=0.0, adapter=1))
    e.run()
    second = e.submit(Request(prompt, 4, temperature=0.0, adapter=2))
    e.run()
    assert e.kv["prefix_hit_tokens"] == 0
    third = e.submit(Request(prompt, 4, temperature=0.0, adapter=2))
    e.run()
    assert e.kv["prefix_hit_tokens"] > 0 and third.tokens == second.tokens != first.tokens


def test_banks_need_rows_and_a_known_adapter():
    model = banked()
    q, v = model.stack.layers.attn.lora_wq, model.stack.layers.attn.lora_wv  # A: (L, D, M, R)
    assert isinstance(q, LoRABank) and q.a.shape == (2, 32, 2, 8)  # both adapt q: rank 4 padded to 8
    assert jnp.any(q.a[:, :, 0, :4]) and not jnp.any(q.a[:, :, 0, 4:]) and jnp.all(jnp.any(q.a[:, :, 1], axis=1))
    assert v.a.shape == (2, 32, 2, 4) and not jnp.any(v.a[:, :, 1]) and not jnp.any(v.scales[:, 1])  # 1's only
    with pytest.raises(ValueError, match="select_adapters"):
        model(jnp.ones((1, 4), jnp.int32))
    graphdef, state = nnx.split(model)
    chosen = nnx.merge(graphdef, select_adapters(state, jnp.array([1]), 2))
    with pytest.raises(ValueError, match="select_adapters"):  # stacked layers run unstacked only in the engine
        chosen(jnp.ones((1, 4), jnp.int32))
    e = Engine(DecodeSteps(model), slots=1)
    one = model_for("llama_tiny", max_seq_len=48, tie_embeddings=False)  # banks in the layers only (no lm_head)
    attach_lora_banks(one, [take_loras(adapted(ADAPTERS[0], 1))])
    assert DecodeSteps(one).adapters == 1
    with pytest.raises(ValueError, match=r"adapter must be an integer in \[0, 2\]"):
        e.submit(Request([1, 2], 3, adapter=3))


def test_speculative_rows_use_their_adapters():
    """Prompt-lookup speculation over the banks: each row's greedy tokens are those of plain decoding."""
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 9, 3, 9, 9, 3], [1, 2, 3]]
    which = [2, 0, 1]
    model = banked()
    plain = run(
        DecodeSteps(model), [Request(p, 16, temperature=0.0, adapter=a) for p, a in zip(prompts, which)], slots=3
    )
    spec = DecodeSteps(model, draft="ngram", draft_tokens=3)
    got = run(spec, [Request(p, 16, temperature=0.0, adapter=a) for p, a in zip(prompts, which)], slots=3)
    assert [t for t, _ in got] == [t for t, _ in plain]


def test_banks_over_a_quantized_base():
    """`serve --adapter ... --weights int8`: the banks (float32) over an int8 base; each row equals its adapter
    alone over the same int8 base."""
    from jaxlm.quantize import store_weights

    prompts = [[3, 14, 15, 92, 65], [27, 18, 28]]
    which = [1, 2]
    got = run(
        DecodeSteps(store_weights(banked(), "int8")),
        [Request(p, 8, temperature=0.0, logprobs=1, adapter=a) for p, a in zip(prompts, which)],
        slots=2,
    )
    for p, a, (tokens, lps) in zip(prompts, which, got):
        alone = DecodeSteps(store_weights(adapted(ADAPTERS[a - 1], a), "int8"))
        want_tokens, want_lps = run(alone, [Request(p, 8, temperature=0.0, logprobs=1)], slots=1)[0]
        assert tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, atol=1e-4)
