"""Bad requests get OpenAI-style JSON errors and the server keeps serving; floods get 503; a client that
goes away frees its slot."""

import dataclasses
import json
import threading
import time

import httpx
import numpy as np
import pytest

from jaxlm.serve.model import Served
from jaxlm.serve.server import build_service, running
from tests.serve.conftest import tiny_served

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"\xff\xfe", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "does not exist"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, 400, "maximum context length"),
        ("/v1/chat/completions", {**CHAT, "n": 5}, 400, "n must be at most 4"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
        ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, 400, "frobnicate: unknown field"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {**COMPLETION, "logprobs": -1}, 400, "logprobs"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "only for echo"),
        ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1, "stream": True}, 400, "streaming"),
        ("/v1/completions", {**COMPLETION, "echo": True, "max_tokens": 0, "stream": True}, 400, "streaming"),
        ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, 400, "one of"),
        ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
        ("/detokenize", {"tokens": [1, 999]}, 400, "token ids"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "context"),
        ("/v1/completions", {**COMPLETION, "prompt": "x" * 128}, 400, "leaving no room"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "no tokens"),
        ("/v1/completions", {**COMPLETION, "prompt": [5, 999]}, 400, "token ids"),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            },
            400,
            "response_format: the JSON schema is not supported",
        ),
        (
            "/v1/completions",
            {
                **COMPLETION,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 5}}},
            },
            400,
            "response_format",
        ),
        (
            "/v1/completions",
            {**COMPLETION, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            400,
            "name",
        ),
        ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
        ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/nothing", COMPLETION, 404, "Not Found"),
    ],
)
def test_bad_request(server, path, body, status, needle):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    assert needle in error_of(r, status)["message"]


def test_unknown_model_path_is_404(server):
    url, _ = server
    error_of(httpx.get(url + "/v1/models/other"), 404)


def _junk(rng) -> bytes:
    """A malformed request body: random bytes, truncated JSON, wrong types, or a valid body with one field
    broken."""
    kind = rng.integers(6)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 64)))
    good = json.dumps(CHAT if rng.random() < 0.5 else COMPLETION)
    if kind == 1:
        return good[: int(rng.integers(0, len(good)))].encode()
    body = dict(CHAT if rng.random() < 0.5 else COMPLETION)
    key = rng.choice(
        [*body, "n", "stop", "seed", "temperature", "stream", "top_p", "extra", "logprobs", "echo", "top_logprobs",
         "response_format"]
    )  # fmt: skip
    values = [None, -1, 0, 10**12, "x", [], {}, [1, "a"], 1e308, True, "é" * 3, {"type": "json_object"}]
    values += [{"type": "json_schema", "json_schema": {"name": "x", "schema": rng.choice([{}, {"type": ["x"]}])}}]
    value = values[int(rng.integers(len(values)))]
    if kind == 2:
        body[key] = value
    elif kind == 3:
        body.pop(rng.choice(list(body)))
    elif kind == 4:
        body["messages"] = [{"role": "user", "content": value}]
    else:
        return json.dumps(value).encode()
    return json.dumps(body).encode()


def test_fuzz_then_a_valid_request_succeeds(server):
    url, _ = server
    rng = np.random.default_rng(1234)
    statuses = set()
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(300):
            path = ["/v1/chat/completions", "/v1/completions", "/tokenize"][int(rng.choice(3, p=[0.45, 0.45, 0.1]))]
            r = client.post(path, content=_junk(rng), headers={"content-type": "application/json"})
            statuses.add(r.status_code)
            assert r.status_code < 500, r.text
            if r.status_code != 200:  # some junk is a valid request after all
                error_of(r, r.status_code)
        ok = client.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert 400 in statuses


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Endless(Served):
    """A served model without stop tokens: a long request runs to its max_tokens, whatever this machine's
    numerics make of the random model's greedy path."""

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset()


def endless() -> Endless:
    return Endless(**{f.name: getattr(tiny_served(), f.name) for f in dataclasses.fields(Served)})


def held(service, at=100):
    """Engine steps wait (up to 60 s) for `release` once a request in a slot has `at` tokens: a long request
    holds its slot until the test lets it go, however fast or loaded the machine. Returns (release, ended):
    ended lists the requests that finished, in order."""
    engine, release, ended = service.worker.engine, threading.Event(), []
    step = engine.step

    def held_step():
        if any(s is not None and len(s.request.tokens) >= at for s in engine.slots):
            release.wait(60)
        changed = step()
        ended.extend(r for r in changed if r.finish_reason is not None)
        return changed

    engine.step = held_step
    return release, ended


def test_flood_beyond_the_slots_gets_503_then_serving_goes_on():
    """One slot, one queue place, a short admission wait: a long request holds the slot; of the flood, the
    queued one waits its bounded time (503) and the others are refused at once (503)."""
    service = build_service(endless(), slots=1, chunk=16, max_queue=1, queue_timeout=1.0)
    release, _ = held(service)
    with running(service) as url:
        long = {**COMPLETION, "max_tokens": 120, "prompt": "x", "stream": True}
        with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/v1/completions", json=long) as s:
            lines = s.iter_lines()
            # The slot is taken (headers come after admission). Not "a data line has come": the random model's
            # greedy path may emit tokens that decode to no text (special tokens) until it ends.
            _wait(lambda: service.worker.load["running"] == 1)
            results = []

            def call():
                results.append(httpx.post(url + "/v1/completions", json=COMPLETION, timeout=30))

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            release.set()
            assert sorted(r.status_code for r in results) == [503] * 4
            assert all("busy" in error_of(r, 503)["message"] for r in results)
            rest = [line for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
        ok = httpx.post(url + "/v1/completions", json=COMPLETION, timeout=30)
        assert ok.status_code == 200


def test_a_client_that_disconnects_frees_its_slot():
    service = build_service(endless(), slots=2, chunk=16)
    release, ended = held(service)
    cancel = service.worker.cancel

    def cancel_and_release(requests):  # the long request goes on once the server has cancelled it
        cancel(requests)
        release.set()

    service.worker.cancel = cancel_and_release
    with running(service) as url:
        body = {**COMPLETION, "prompt": "x", "max_tokens": 120, "stream": True}
        with httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=body):
                _wait(lambda: service.worker.load["running"] == 1 and len(ended) == 0)
            # Leaving the block closes the connection mid-stream.
        _wait(lambda: service.worker.load["running"] == 0)
        assert [r.finish_reason for r in ended] == ["cancelled"]
        release.clear()
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        # It may give up before its request reaches a slot (a loaded machine): wait for the request's end,
        # which only a cancel brings (it is held at 100 of its 120 tokens until then).
        _wait(lambda: len(ended) == 2)
        assert [r.finish_reason for r in ended] == ["cancelled"] * 2
        _wait(lambda: service.worker.load["running"] == 0)
