"""Continuous batching: per-row cache state, requests joining and leaving, one compilation per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.engine.steps import bucket, bucket_below
from jaxlm.errors import ConfigError
from jaxlm.generate import Generator, generate_uncached
from tests.test_generate import model_for


def test_batched_equals_alone_past_the_refill():
    """Prompts of different lengths fill their rows at different steps; each row refills on its own."""
    model = model_for("llama_tiny", max_seq_len=24)
    prompts = [[1, 2, 3], list(range(5, 22)), [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    out = Generator(model, window_shift=5).generate(prompts, max_new_tokens=50, temperature=0.0)
    for p, o in zip(prompts, out):
        assert o == generate_uncached(model, p, max_new_tokens=50, window_shift=5)


def test_sampled_rows_do_not_depend_on_the_batch():
    model = model_for("gpt_tiny", max_seq_len=32)
    gen = Generator(model, window_shift=6)
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4, 4, 4, 4]]
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=3)
    together = gen.generate(prompts, **kw)
    steps = gen.steps
    for b, p in enumerate(prompts):
        engine = Engine(steps, slots=1, window_shift=6)
        r = engine.submit(Request(p, 40, temperature=1.0, top_p=0.9, seed=3, stream=b))
        engine.run()
        assert r.tokens == together[b]
    assert len({tuple(o) for o in together}) == 3


def test_requests_join_and_leave_without_recompiling():
    """More requests than slots, of mixed lengths (chunked prefill, refills), some arriving mid-stream,
    one cancelled: each gets what it would alone, and each step compiled once."""
    model = model_for("llama_tiny", max_seq_len=32)
    steps = DecodeSteps(model)
    engine = Engine(steps, slots=3, chunk=4, window_shift=8)
    engine.warm_up()  # every row count a step may run on: 1, 2, 3
    compiled = steps.prefill._cache_size(), steps.decode._cache_size()
    assert compiled == (3, 3)
    rng = np.random.default_rng(0)
    lengths = [1, 3, 11, 30, 5, 2, 17, 40]  # 30 and 40: longer than the 24-token window
    budgets = [5, 40, 12, 3, 60, 1, 20, 9]
    requests = [Request(rng.integers(1, 128, n).tolist(), m, temperature=0.0) for n, m in zip(lengths, budgets)]
    victim = engine.submit(Request([3, 1, 4], 100, temperature=0.0))  # cancelled while decoding
    queued = engine.submit(Request([5, 5], 100, temperature=0.0))  # cancelled while queued
    for r in requests[:4]:
        engine.submit(r)
    engine.cancel(queued)
    late = iter(requests[4:])
    steps_run = 0
    while engine.active:
        engine.step()
        steps_run += 1
        if steps_run % 3 == 0 and (r := next(late, None)) is not None:
            engine.submit(r)
        if steps_run == 6:
            engine.cancel(victim)
        assert sum(s is not None for s in engine.slots) <= 3
    for r in requests:
        assert r.finish_reason == "length" and len(r.tokens) == r.max_new_tokens
        assert r.tokens == generate_uncached(model, r.prompt, max_new_tokens=r.max_new_tokens, window_shift=8)
    assert victim.finish_reason == "cancelled" and 0 < len(victim.tokens) < 100
    assert queued.finish_reason == "cancelled" and queued.tokens == []
    assert (steps.prefill._cache_size(), steps.decode._cache_size()) == compiled  # nothing compiled since


def test_prefill_takes_its_token_budget_earliest_first():
    """prefill_tokens=8 at chunk 4: a prefill step runs on at most 2 rows, the earliest admitted first (the
    rest wait their turn), only 1 and 2 rows compile for prefill, and each row gets what it would alone."""
    model = model_for("llama_tiny", max_seq_len=32)
    steps = DecodeSteps(model)
    engine = Engine(steps, slots=4, chunk=4, prefill_tokens=8)
    assert engine.prefill_rows == 2 and {n for n, _ in engine.shapes(prefill=True)} == {1, 2}
    engine.warm_up()
    compiled = steps.prefill._cache_size()
    prompts = [list(range(1, 10)), [5, 6], [7, 7, 7, 7, 7], [3]]
    requests = [engine.submit(Request(p, 6, temperature=0.0)) for p in prompts]
    engine.step()  # the first two admitted (slots 0 and 1) take the step's two rows
    assert [len(engine.slots[b].pending) for b in range(4)] == [5, 0, 5, 1]
    engine.step()  # slot 0 goes on, slot 2 joins; slot 3 (admitted last) still waits
    assert [len(engine.slots[b].pending) for b in range(4)] == [1, 0, 1, 1]
    engine.run()
    assert steps.prefill._cache_size() == compiled
    for p, r in zip(prompts, requests):
        assert r.tokens == generate_uncached(model, p, max_new_tokens=6)
    with pytest.raises(ValueError, match="prefill_tokens"):
        Engine(steps, slots=2, prefill_tokens=0)


def test_logprobs_are_the_models_distribution_prompt_and_sampled():
    """Scored prompt (over three prefill chunks) and sampled tokens: log p of each next token and the top 3,
    equal to the full forward's log-softmax (before temperature); a request that does not ask gets none."""
    model = model_for("llama_tiny", max_seq_len=32)
    engine = Engine(DecodeSteps(model), slots=2, chunk=4)
    prompt = list(range(3, 14))
    r = engine.submit(Request(prompt, 5, temperature=0.8, top_k=4, seed=1, logprobs=3, score_prompt=True))
    plain = engine.submit(Request([5, 6, 7], 5, temperature=0.0))
    engine.run()
    full = prompt + r.tokens
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([full]))[0][0]))[:-1]  # position j: token j + 1
    assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None
    assert len(r.prompt_logprobs) == len(prompt) and len(r.token_logprobs) == len(r.tokens) == 5
    np.testing.assert_allclose(r.prompt_logprobs[1:] + r.token_logprobs, lp[np.arange(len(lp)), full[1:]], atol=2e-5)
    for j, top in enumerate(r.prompt_top_logprobs[1:] + r.top_logprobs):
        ids = np.argsort(-lp[j], kind="stable")[:3]
        assert [t for t, _ in top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in top], lp[j, ids], atol=2e-5)
    assert plain.token_logprobs == [] and plain.prompt_logprobs == [] and len(plain.tokens) == 5
    for bad, message in [
        (dict(logprobs=21), "logprobs must be"),
        (dict(score_prompt=True), "needs logprobs"),
        (dict(logprobs=0, score_prompt=True, prompt=list(range(32))), "at most 31 tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.submit(Request(**{"prompt": [1, 2], "max_new_tokens": 1, **bad}))


def test_prefill_pieces_score_and_continue_as_alone():
    """A shrinking engine with short chunks prefills in pieces of C / 4 tokens: a row's next C tokens are up
    to four rows of one step, several requests share a step, a step is never padded (its pieces are a
    compiled row count; a row's remaining pieces wait for the next step), and every prompt log-probability
    and token equals the full forward's (the pieces of a row see each other's K/V, written earlier in the
    same step)."""
    model = model_for("llama_tiny", max_seq_len=96)
    engine = Engine(DecodeSteps(model), slots=4, chunk=32, prefill_tokens=64)
    assert engine.piece == 8 and engine.prefill_rows == 8
    plans, run_rows = [], engine._prefill_rows

    split = []

    def recorded(plan, T, touched):
        plans.append((list(plan), T))
        split.extend(n * T < len(engine.slots[b].pending[: engine.C]) for b, n in plan)
        run_rows(plan, T, touched)

    engine._prefill_rows = recorded
    rng = np.random.default_rng(0)
    shared = rng.integers(1, 128, 20).tolist()  # two prompts share its first two blocks (prefix cache)
    prompts = [rng.integers(1, 128, n).tolist() for n in (3, 13, 45, 9)] + [shared + [7, 8], shared + [9] * 12]
    requests = [engine.submit(Request(p, 4, temperature=0.0, logprobs=2, score_prompt=True)) for p in prompts]
    engine.run()
    assert {T for _, T in plans} == {8} and max(sum(n for _, n in plan) for plan, _ in plans) <= 8
    assert all(bucket(sum(n for _, n in plan)) == sum(n for _, n in plan) for plan, _ in plans)
    assert any(split)  # a row's pieces over two steps
    assert [bucket_below(n) for n in (1, 2, 3, 5, 7, 8, 11, 12, 13, 47, 48, 95)] == [
        1,
        2,
        3,
        4,
        6,
        8,
        8,
        12,
        12,
        32,
        48,
        64,
    ]
    assert any(n > 1 for plan, _ in plans for _, n in plan) and any(len(plan) > 1 for plan, _ in plans)
    assert engine.kv["prefix_hit_tokens"] > 0
    for p, r in zip(prompts, requests):
        full = p + r.tokens
        lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([full]))[0][0]))[:-1]
        np.testing.assert_allclose(
            r.prompt_logprobs[1:] + r.token_logprobs, lp[np.arange(len(lp)), full[1:]], atol=2e-5
        )
        assert [t for t, _ in r.prompt_top_logprobs[-1]] == np.argsort(-lp[len(p) - 2], kind="stable")[:2].tolist()
        assert r.tokens == generate_uncached(model, p, max_new_tokens=4)


def test_stop_tokens_and_sampling_settings_per_request():
    model = model_for("llama_tiny", max_seq_len=64)
    engine = Engine(DecodeSteps(model), slots=2)
    free = engine.submit(Request([1, 2], 30, temperature=0.0))
    engine.run()
    stop = free.tokens[4]
    a = engine.submit(Request([1, 2], 30, temperature=0.0, stop_ids=frozenset({stop})))
    b = engine.submit(Request([1, 2], 30, temperature=1.0, top_k=5, seed=1))
    engine.run()
    assert a.finish_reason == "stop" and a.stop_token == stop and a.tokens == free.tokens[: free.tokens.index(stop)]
    assert b.finish_reason == "length" and b.tokens != free.tokens


@pytest.mark.parametrize(
    "request_, message",
    [
        (Request([], 3), "at least one token"),
        (Request([1], 0), "max_new_tokens"),
        (Request([1], 3, temperature=-1.0), "temperature"),
        (Request([1], 3, top_p=0.0), "top_p"),
        (Request([1], 3, top_k=-2), "top_k"),
    ],
)
def test_bad_requests_are_refused_before_queueing(request_, message):
    engine = Engine(DecodeSteps(model_for("gpt_tiny", max_seq_len=16)), slots=1)
    with pytest.raises(ValueError, match=message):
        engine.submit(request_)
    assert engine.active == 0


def _recorded_tables(steps):
    """Wraps the steps so that the block-table shape of every decode step is recorded."""
    shapes, decode = [], steps.decode

    def recording(params, draft_params, caches, prev, table, *rest):
        shapes.append(table.shape)
        return decode(params, draft_params, caches, prev, table, *rest)

    steps.decode = recording
    return shapes


def test_a_step_reads_the_blocks_in_use_not_the_context():
    """The same request on a 4,096- and a 256-token context: the same blocks read per step (64 slots), the same
    tokens, and a KV pool sized by the slots' use, not by slots x max_seq_len."""
    outs, tables = [], []
    for context in (4096, 256):
        model = model_for("llama_tiny", max_seq_len=context)
        steps = DecodeSteps(model)
        tables.append(_recorded_tables(steps))
        engine = Engine(steps, slots=4)
        r = engine.submit(Request(list(range(1, 11)), 20, temperature=0.0))
        engine.run()
        outs.append(r.tokens)
        full = 4 * context * engine.kv["kv_block_bytes"] // steps.Z
        assert engine.kv["kv_bytes"] <= min(full, 4 * 256 * engine.kv["kv_block_bytes"] // steps.Z)
        assert engine.kv["kv_blocks_used"] == 0 and engine.kv["kv_blocks_reserved"] == 0  # all returned
    assert outs[0] == outs[1]
    assert set(tables[0]) == set(tables[1]) == {(1, 64 // 16)}


def test_kv_budget_queues_requests_and_the_pool_grows():
    """A budget of one full context plus a block for four slots: requests wait for blocks instead of failing,
    the pool starts at one block and doubles as rows take blocks (recycled blocks hold old entries), and every
    request gets what it would alone."""
    model = model_for("llama_tiny", max_seq_len=48)
    steps = DecodeSteps(model, block_size=8)
    engine = Engine(steps, slots=4, chunk=8, window_shift=8, kv_blocks=steps.row_blocks + 1, initial_blocks=1)
    rng = np.random.default_rng(1)
    requests = [
        engine.submit(Request(rng.integers(1, 128, n).tolist(), m, temperature=0.0))
        for n, m in [(5, 9), (20, 30), (3, 60), (12, 4), (30, 25), (2, 2)]
    ]
    grew, waited = set(), False
    while engine.active:
        engine.step()
        grew.add(engine.pool_blocks)
        waited |= bool(engine.queue) and engine.free_slots > 0
        assert engine.reserved <= engine.budget and engine.pool_blocks <= engine.budget
    assert waited and len(grew) > 1 and max(grew) == engine.budget
    for r in requests:
        assert r.tokens == generate_uncached(model, r.prompt, max_new_tokens=r.max_new_tokens, window_shift=8)


def test_a_budget_below_one_context_is_refused():
    steps = DecodeSteps(model_for("llama_tiny", max_seq_len=64), block_size=16)
    with pytest.raises(ConfigError, match="less than one full context"):
        Engine(steps, slots=2, kv_blocks=3)


def test_experts_decode_each_row_as_alone():
    """A mixture of experts in the engine: rows share the experts' dispatch, yet each row's tokens are what it
    would get alone (decoding is dropless whatever the training capacity), and greedy equals recompute."""
    model = model_for("llama_tiny", max_seq_len=48, num_experts=4, experts_per_token=2, capacity_factor=0.5)
    prompts = [[1, 2, 3], list(range(5, 20)), [9, 8, 7, 6]]
    gen = Generator(model, window_shift=5)
    together = gen.generate(prompts, max_new_tokens=20, temperature=0.0)
    for p, o in zip(prompts, together):
        assert o == gen.generate([p], max_new_tokens=20, temperature=0.0)[0]
    dropless = model_for("llama_tiny", max_seq_len=48, num_experts=4, experts_per_token=2)
    out = Generator(dropless, window_shift=5).generate(prompts[:1], max_new_tokens=20, temperature=0.0)[0]
    assert out == generate_uncached(dropless, prompts[0], max_new_tokens=20, window_shift=5)
