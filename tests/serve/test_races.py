"""The engine thread against the request threads: each race is injected deterministically (a hook runs the
other thread's move at the worst moment), then a stress test runs the real server under many clients."""

import asyncio
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.engine import Request
from jaxlm.serve.app import Service, create_app
from jaxlm.serve.choices import Choice, TextStream
from jaxlm.serve.server import build_service, running
from jaxlm.serve.worker import Busy, EngineWorker
from tests.serve.conftest import tiny_served


class _Tokens(list):
    """A request's tokens whose len() lets the engine thread move first: `move` runs once, as len is read."""

    def __init__(self, items, move):
        super().__init__(items)
        self.move = move

    def __len__(self):
        n = super().__len__()
        move, self.move = self.move, None
        if move is not None:
            move()
        return n


def test_a_choice_keeps_the_last_token_when_its_request_ends_between_two_reads():
    tok = ByteTokenizer()
    r = Request([1], max_new_tokens=3)

    def engine_moves():  # the engine appends the last token, then ends the request
        list.append(r.tokens, tok.encode("c")[0])
        r.finish_reason = "length"

    r.tokens = _Tokens(tok.encode("ab"), engine_moves)
    choice, text = Choice(r, TextStream(tok, [])), ""
    while choice.finish_reason is None:
        text += choice.advance()
    assert (text, choice.finish_reason) == ("abc", "length")


class _FakeEngine:
    """The attributes EngineWorker reads; submit/step/abort do what each test needs."""

    N, free_slots, slots, kv = 1, 1, [None], {}
    steps = SimpleNamespace(draft=None)

    def __init__(self):
        self.queue: list[Request] = []

    @property
    def active(self):
        return len(self.queue)

    def submit(self, r):
        self.queue.append(r)
        return r

    def cancel(self, r):
        pass


def test_a_request_that_ends_as_soon_as_it_is_queued_is_heard_and_forgotten():
    """The engine thread may admit and finish a request between its queueing and the end of submit."""
    engine = _FakeEngine()
    worker = EngineWorker(engine, max_queue=4)

    def submit_and_finish(r):  # the engine thread runs a whole step before submit returns
        r.admitted, r.finish_reason = True, "length"
        r.tokens.append(7)
        worker._tell([r])
        return r

    engine.submit = submit_and_finish
    heard, r = [], Request([1], max_new_tokens=1)
    worker.submit([r], heard.append)
    assert heard == [r]
    assert not worker._listeners  # nothing left behind for a request that is over


def test_an_engine_that_cannot_be_reset_fails_the_worker_visibly():
    engine = _FakeEngine()

    def broken(*_):
        raise RuntimeError("device lost")

    engine.step = engine.abort = broken
    worker = EngineWorker(engine, max_queue=4).start()
    told, r = threading.Event(), Request([1], max_new_tokens=4)
    worker.submit([r], lambda _: told.set())
    assert told.wait(30)
    worker._thread.join(30)
    assert r.finish_reason == "error" and not worker._thread.is_alive()
    assert worker.load["status"] == "error" and "device lost" in worker.failed
    with pytest.raises(Busy, match="the engine has failed .*device lost"):
        worker.submit([Request([1], max_new_tokens=1)], lambda _: None)
    served = SimpleNamespace(name="tiny", context=64)
    with TestClient(create_app(Service(served, worker, queue_timeout=1.0))) as client:
        health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "device lost" in health.json()["error"]


async def _one(client, i, stream):
    body = {"model": "tiny", "prompt": f"q{i}", "max_tokens": 1 + i % 6, "temperature": 1.0, "seed": i}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]
    text, reason = "", None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason, None


@pytest.mark.slow
def test_many_concurrent_short_requests_streamed_and_not():
    """200 requests (100 prompts, each plain and streamed) at 48-way concurrency on 4 slots: none is refused
    or times out, a `length` reply has exactly max_tokens tokens, a stream equals its plain reply."""
    service = build_service(tiny_served(), slots=4, chunk=16, max_queue=200, queue_timeout=60.0, warm_up_tokens=32)
    with running(service) as url:

        async def main():
            gate = asyncio.Semaphore(48)
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:

                async def call(i, stream):
                    async with gate:
                        return await _one(client, i, stream)

                jobs = [call(i, s) for i in range(100) for s in (False, True)]
                return await asyncio.gather(*jobs)

        results = asyncio.run(main())
        assert service.worker.load["running"] == 0 and service.worker.load["queued"] == 0
    plain, streamed = results[0::2], results[1::2]
    for i, ((text, reason, tokens), (s_text, s_reason, _)) in enumerate(zip(plain, streamed)):
        assert reason in ("length", "stop")
        if reason == "length":
            assert tokens == 1 + i % 6, (i, text)
        assert (s_text, s_reason) == (text, reason), i
    assert sum(r[1] == "length" for r in plain) > 60  # mostly length: the counts above were checked
