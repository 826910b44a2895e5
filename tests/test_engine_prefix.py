"""Prefix caching (`jaxlm.engine.prefix`): prompts that begin alike reuse the KV blocks already computed, and
every output equals the output without caching."""

import jax
import numpy as np
import pytest

from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.engine.prefix import PrefixCache, block_names, root_name
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
    # Prompt 2 reuses prompt 1's 5 blocks; prompt 3 its first 2 and the first token of a copy of the third; the
    # repeat of prompt 1 all 5 and 2 tokens of a copy of its last block (its last token is prefilled again, to
    # sample after).
    assert engine.kv["prefix_hit_tokens"] == 4 * (5 + 2 + 5) + 1 + 2
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
    """A budget of 20 blocks and six prompts of 3 named blocks and a kept last block (which holds the new tokens
    too): the sixth evicts the first's blocks (the least recently used); run again newest first, five hit and
    the first, computed again, gives the same output."""
    model = model_for("llama_tiny", max_seq_len=32)
    steps = DecodeSteps(model, block_size=4)
    engine = Engine(steps, slots=1, chunk=8, kv_blocks=20)
    prompts = [list(range(k, k + 13)) for k in range(1, 120, 20)]
    first = [Request(p, 3, temperature=0.0) for p in prompts]
    run(engine, first)
    assert engine.kv["kv_blocks"] == 20 and engine.kv["kv_blocks_cached"] == 20
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
    assert block_names(list(range(12)), 4, 3, adapter=1)[0] != names[0]
    assert cache.add(names[0], 7, root_name(), [0, 1, 2, 3]) and not cache.add(names[0], 8, root_name(), [0, 1, 2, 3])
    assert cache.match(names, scored=False) == [7] and cache.refs[7] == 2
    assert cache.release(7) and cache.release(7) and list(cache.idle) == [7] and not cache.release(3)
    assert cache.evict() == 7 and cache.evict() is None and cache.match(names, scored=False) == []
    assert not cache.kept and not cache.starts and not cache.block_of


def test_prefix_cache_finds_blocks_by_their_first_tokens():
    """Any kept block (named, or a prompt's last) is found under its parent by the longest common prefix of
    tokens; a scored lookup skips blocks without scores; a tail another kept block covers is not kept."""
    cache = PrefixCache()
    parent = block_names([1, 2, 3, 4], 4, 1)[0]
    assert cache.add(b"n", 3, parent, [5, 6, 7, 8])
    assert cache.add_tail(4, parent, [5, 6, 9], scores=(None, (-1.0, []), (-2.0, [])))
    assert not cache.add_tail(5, parent, [5, 6, 7])  # block 3 begins with these already
    assert cache.longest(parent, [5, 6, 7, 1], scored=False) == (3, 3)
    assert cache.longest(parent, [5, 6, 9, 9], scored=False) == (4, 3)
    assert cache.longest(parent, [5, 6, 7], scored=True) == (4, 2)  # block 3 has no scores
    assert cache.longest(root_name(), [5, 6, 7], scored=False) == (None, 0)  # another parent
    assert cache.longest(parent, [6], scored=False) == (None, 0) and cache.longest(parent, [], False) == (None, 0)
    assert cache.release(4) and cache.release(3) and list(cache.idle) == [4, 3]
    assert cache.evict() == 4 and cache.longest(parent, [5, 6, 9], scored=False) == (3, 2)
    cache.hold(3)
    assert cache.clear() == [] and cache.longest(parent, [5], scored=False) == (None, 0)


def test_choices_copy_the_context_tail_and_equal_uncached_scores():
    """lm-eval's multiple choice: a context that ends inside a block, then four choices, scored together. The
    first choice computes the context; the others wait for it, copy its partial last block and prefill from
    their own first token; every log-probability equals the uncached engine's."""
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=8)
    context = list(range(30, 51))  # 21 tokens: 2 full blocks, 5 tokens of the third
    choices = [[3, 4], [5], [6, 7, 8], [3, 9]]

    def requests():
        return [Request(context + c, 1, temperature=0.0, logprobs=2, score_prompt=True) for c in choices]

    plain, cached = requests(), requests()
    run(Engine(steps, slots=4, chunk=32, prefix_caching=False), plain)
    engine = Engine(steps, slots=4, chunk=32)
    run(engine, cached)
    # Choices 2-4: 2 named blocks and the copy's 5 context tokens; choice 4 also its first token, [3] (choice
    # 1's). A copy saves all but the last cached token (computed again for the next one's log-probability).
    assert engine.kv["prefix_hit_tokens"] == 3 * 21 + 1
    for a, b in zip(cached, plain):  # (steps of other shapes: float rounding apart)
        assert a.tokens == b.tokens and a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(a.prompt)
        np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-5)
        top_a, top_b = (np.array([t for t in x.prompt_top_logprobs[1:]]) for x in (a, b))
        np.testing.assert_array_equal(top_a[..., 0], top_b[..., 0])
        np.testing.assert_allclose(top_a[..., 1], top_b[..., 1], atol=1e-5)


@pytest.mark.parametrize("slots,shrink", [(2, True), (1, False)])
def test_a_copied_block_leaves_its_source_intact(slots, shrink):
    """A row that copies another's last block and writes its own tokens after the common ones changes nothing
    in the source: the source's producer goes on decoding, and a third prompt that copies the source later
    decodes what it decodes alone (steps of as many rows as they serve, or always all rows)."""
    model = model_for("llama_tiny", max_seq_len=64)
    steps = DecodeSteps(model, block_size=8)
    base = list(range(40, 52))  # 1 full block, 4 tokens of the second
    prompts = [base + [1], base[:10] + [2, 2, 2], base + [1, 5]]
    engine = Engine(steps, slots=slots, chunk=32, shrink=shrink)
    cached = [Request(p, 12, temperature=0.0) for p in prompts]
    run(engine, cached)
    assert engine.kv["prefix_hit_tokens"] == (8 + 2) + (8 + 5)  # the second copies 2 tokens, the third 5
    for r in cached:
        alone = Request(r.prompt, 12, temperature=0.0)
        run(Engine(steps, slots=1, prefix_caching=False), [alone])
        assert r.tokens == alone.tokens


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
    # The old blocks are free again, not lost: every block of the pool is free or idle (no row holds one).
    assert len(engine.free_blocks) + engine.kv["kv_blocks_idle"] == engine.kv["kv_blocks"]
    fresh = Request(prompt, 4, temperature=0.0)
    run(Engine(steps, slots=1, prefix_caching=False), [fresh])
    assert again.tokens == fresh.tokens
