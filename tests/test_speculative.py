"""Speculative decoding: greedy output identical to the model alone (a draft model or prompt lookup, batched,
past the context refill), and sampling that keeps the model's distribution (chi-square, fixed seeds)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.engine import DecodeSteps, Engine, Request, prompt_lookup
from jaxlm.errors import ConfigError
from jaxlm.generate import Generator
from jaxlm.nn.transformer import TransformerLM
from tests.ops.test_speculative import CHI2_999, chi2
from tests.test_generate import model_for


def draft_for(target, seed=1, **kw):
    return TransformerLM(dataclasses.replace(target.cfg, num_layers=1, **kw), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("kind", ["model", "ngram", "self"])
def test_greedy_is_identical_for_256_tokens(kind):
    target = model_for("llama_tiny", max_seq_len=96)
    draft = {"model": draft_for(target), "ngram": "ngram", "self": target}[kind]
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 7], list(range(40, 90))]
    plain = Generator(target, window_shift=10).generate(prompts, max_new_tokens=256, temperature=0.0)
    gen = Generator(target, window_shift=10, draft=draft, draft_tokens=4)
    assert gen.generate(prompts, max_new_tokens=256, temperature=0.0) == plain  # 256 > 96: refills on the way
    stats = gen.stats
    assert stats["drafted"] > 0 and stats["kept"] <= stats["drafted"]
    if kind == "self":  # a draft that is the model itself is always right
        assert stats["kept"] == stats["drafted"]
    # One shape per power of two of blocks read (64 and 96 slots here), and nothing new on a second run.
    compiled = gen.steps.speculate._cache_size()
    assert compiled <= 2
    if kind == "ngram":
        assert gen.generate(prompts, max_new_tokens=256, temperature=0.0) == plain
        assert gen.steps.speculate._cache_size() == compiled


def test_sampling_keeps_the_models_distribution():
    """2,000 sampled continuations of one prompt: the second token, after the most common first token,
    follows the model's own distribution there, though a poor draft proposed it."""
    V = 8
    base = model_for("llama_tiny", max_seq_len=32).cfg
    target = TransformerLM(dataclasses.replace(base, vocab_size=V, init_std=0.5), rngs=nnx.Rngs(3))
    draft = draft_for(target, seed=9)
    prompt = [1, 5, 2]
    engine = Engine(DecodeSteps(target, draft=draft, draft_tokens=3), slots=64, chunk=4)
    requests = [engine.submit(Request(prompt, 4, temperature=0.8, seed=i)) for i in range(2000)]
    engine.run()
    pairs = np.array([r.tokens[:2] for r in requests if len(r.tokens) >= 2])
    first = np.bincount(pairs[:, 0], minlength=V).argmax()
    seconds = pairs[pairs[:, 0] == first, 1]
    logits, _ = target(jnp.asarray([[*prompt, int(first)]]))
    want = np.asarray(jax.nn.softmax(logits[0, -1] / 0.8))
    assert len(seconds) > 300 and chi2(np.bincount(seconds, minlength=V), want) < CHI2_999[V - 1]
    dlogits, _ = draft(jnp.asarray([[*prompt, int(first)]]))
    q = np.asarray(jax.nn.softmax(dlogits[0, -1] / 0.8))
    assert chi2(np.bincount(seconds, minlength=V), q) > CHI2_999[V - 1]  # the draft's distribution it is not
    assert 0 < engine.stats["kept"] < engine.stats["drafted"]


def test_prompt_lookup():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert prompt_lookup([5, 6, 5], 3) == [6, 5]
    assert prompt_lookup([1, 2, 3], 2) == []


def test_a_draft_must_fit_the_model():
    target = model_for("llama_tiny", max_seq_len=64)
    with pytest.raises(ConfigError, match="vocabulary"):
        DecodeSteps(target, draft=draft_for(target, vocab_size=64))
    with pytest.raises(ConfigError, match="max_seq_len"):
        DecodeSteps(target, draft=draft_for(target, max_seq_len=32))
    with pytest.raises(ConfigError, match="draft_tokens"):
        DecodeSteps(target, draft="ngram", draft_tokens=0)
