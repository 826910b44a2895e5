"""Continuous batching: per-row cache state, requests joining and leaving, one compilation per step."""

import numpy as np
import pytest

from jaxlm.engine import DecodeSteps, Engine, Request
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
