"""Prefix caching (`jaxlm.engine.prefix`): prompts that begin alike reuse the KV blocks already computed, and
every output equals the output without caching."""

import jax
import numpy as np

from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.engine.prefix import PrefixCache, block_names
from tests.test_generate import model_for


def run(engine, requests):
    for r in requests:
        engine.submit(r)
    steps = 0
    while engine.active:
        engine.step()
        steps += 1
    return steps


def test_shared_prompts_reuse_blocks_and_equal_uncached_output():
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=4)
    system = list(range(10, 30))  # 20 tokens: 5 full blocks
    prompts = [system + [1, 2, 3], system + [7], system[:9] + [5, 5], [3, 1, 4]]

    def requests():
        return [Request(p, 8, temperature=0.0) for p in prompts] + [Request(prompts[0], 8, temperature=0.9, seed=2)]

    plain = requests()
    run(Engine(steps, slots=2, chunk=8, prefix_caching=False), plain)
    cached = requests()
    engine = Engine(steps, slots=2, chunk=8)
    run(engine, cached)
    assert [r.tokens for r in cached] == [r.tokens for r in plain]
    # Prompt 2 reuses prompt 1's 5 blocks; prompt 3 its first 2; the repeat of prompt 1 all 5 (its last token
    # is prefilled again, to sample after).
    assert engine.kv["prefix_hit_tokens"] == 4 * (5 + 2 + 5)
    assert engine.kv["kv_blocks_cached"] >= 5 and engine.kv["kv_blocks_idle"] == engine.kv["kv_blocks_cached"]


def test_n_choices_prefill_the_prompt_once():
    """Four requests of one prompt admitted together: the first prefills it, the others wait one step and
    reuse its blocks; all four are what each would be alone."""
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=4)
    prompt = list(range(3, 40))  # 37 tokens: 9 full blocks
    together = [Request(prompt, 6, temperature=1.0, seed=5, stream=j) for j in range(4)]
    engine = Engine(steps, slots=4, chunk=64)
    run(engine, together)
    assert engine.kv["prefix_hit_tokens"] == 3 * 36
    for j, r in enumerate(together):
        alone = Request(prompt, 6, temperature=1.0, seed=5, stream=j)
        run(Engine(steps, slots=1, prefix_caching=False), [alone])
        assert r.tokens == alone.tokens


def test_scored_prompts_reuse_their_logprobs():
    """Echo scoring from cached blocks: the same prompt log-probabilities (and alternatives) as computed."""
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=4)
    engine = Engine(steps, slots=1, chunk=8)
    context = list(range(20, 33))
    first, second = (
        Request(context + tail, 1, temperature=0.0, logprobs=3, score_prompt=True) for tail in ([1, 2], [9])
    )
    unscored = Request(list(range(40, 52)), 1, temperature=0.0)  # names blocks without scores
    scored_after = Request(list(range(40, 52)) + [3], 1, temperature=0.0, logprobs=0, score_prompt=True)
    run(engine, [first, second, unscored, scored_after])
    assert engine.kv["prefix_hit_tokens"] == 12  # second reuses context's 3 blocks; scored_after reuses none
    fresh = Engine(steps, slots=1, chunk=8, prefix_caching=False)
    for r in (second, scored_after):
        alone = Request(r.prompt, 1, temperature=0.0, logprobs=r.logprobs, score_prompt=True)
        run(fresh, [alone])
        assert r.prompt_top_logprobs == alone.prompt_top_logprobs
        np.testing.assert_allclose(r.prompt_logprobs[1:], alone.prompt_logprobs[1:], atol=1e-6)
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt)


def test_idle_blocks_are_evicted_least_recently_used_at_the_budget():
    """A budget of 16 blocks and six prompts of 3 named blocks (+ 1 for the tail and new tokens): the sixth
    evicts the first's blocks (the least recently used); run again newest first, five hit and the first,
    computed again, gives the same output."""
    model = model_for("llama_tiny", max_seq_len=32)
    steps = DecodeSteps(model, block_size=4)
    engine = Engine(steps, slots=1, chunk=8, kv_blocks=16)
    prompts = [list(range(k, k + 13)) for k in range(1, 120, 20)]
    first = [Request(p, 3, temperature=0.0) for p in prompts]
    run(engine, first)
    assert engine.kv["kv_blocks"] == 16 and engine.kv["kv_blocks_cached"] <= 16
    again = [Request(p, 3, temperature=0.0) for p in prompts[::-1]]
    hits = []
    for r in again:
        before = engine.kv["prefix_hit_tokens"]
        run(engine, [r])
        hits.append(engine.kv["prefix_hit_tokens"] - before)
    assert hits == [12, 12, 12, 12, 12, 0]
    assert [r.tokens for r in again] == [r.tokens for r in first[::-1]]


def test_prefix_cache_bookkeeping():
    cache = PrefixCache()
    names = block_names(list(range(12)), 4, 3)
    assert len(set(names)) == 3 and block_names(list(range(8)) + [0, 0, 0, 0], 4, 3)[:2] == names[:2]
    assert block_names([9] + list(range(1, 12)), 4, 3)[1] != names[1]  # a name covers the whole prefix
    assert cache.add(names[0], 7) and not cache.add(names[0], 8)
    assert cache.match(names, scored=False) == [7] and cache.refs[7] == 2
    assert cache.release(7) and cache.release(7) and list(cache.idle) == [7] and not cache.release(3)
    assert cache.evict() == 7 and cache.evict() is None and cache.match(names, scored=False) == []


def test_new_weights_empty_the_cache():
    """RL rollouts replace the weights between calls: blocks computed with the old ones are not reused."""
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=4)
    engine = Engine(steps, slots=1)
    prompt = list(range(5, 30))
    run(engine, [Request(prompt, 2, temperature=0.0)])
    steps.params = jax.tree.map(lambda a: a * 1.5 if a.dtype == np.float32 else a, steps.params)
    again = Request(prompt, 4, temperature=0.0)
    run(engine, [again])
    assert engine.kv["prefix_hit_tokens"] == 0
    fresh = Request(prompt, 4, temperature=0.0)
    run(Engine(steps, slots=1, prefix_caching=False), [fresh])
    assert again.tokens == fresh.tokens
