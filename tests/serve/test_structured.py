"""Structured output: response_format json_schema / json_object through llguidance's token masks, applied in
the engine's sampler. A random model writes text that parses and validates against the schema."""

import json

import httpx
import jsonschema
import numpy as np
import pytest

from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.serve.server import build_service, running
from jaxlm.serve.structured import Grammars
from tests.serve.conftest import tiny_served

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["king", "fool", "ghost"]},
        "lines": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "lines"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server():
    """The tiny server with room for a chat prompt and a whole object (a byte a token)."""
    service = build_service(tiny_served(max_seq_len=256), slots=4, chunk=16, queue_timeout=20.0)
    with running(service) as url:
        yield url, service


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completions_and_chat_follow_the_schema(server, temperature):
    url, _ = server
    texts = []
    for seed in range(3):
        body = {"model": "tiny", "prompt": "Who is there?", "max_tokens": 100, "temperature": temperature, "seed": seed}
        got = httpx.post(url + "/v1/completions", json={**body, "response_format": FORMAT, "n": 2}, timeout=60)
        assert got.status_code == 200, got.text
        for choice in got.json()["choices"]:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["text"]), PERSON)
            texts.append(choice["text"])
        messages = [{"role": "user", "content": f"Name a character ({seed})."}]
        chat = {"model": "tiny", "messages": messages, "response_format": FORMAT, "temperature": temperature}
        reply = httpx.post(url + "/v1/chat/completions", json={**chat, "seed": seed}, timeout=60).json()
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), PERSON)
    assert len(set(texts)) > 1 if temperature else True


def test_streamed_and_json_object(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "A ghost", "max_tokens": 100, "temperature": 0, "response_format": FORMAT}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[len("data: ") :])["choices"][0]["text"]
    jsonschema.validate(json.loads(text), PERSON)
    # A request that cannot finish its JSON within max_tokens ends as "length", what it wrote a prefix.
    short = {**body, "max_tokens": 4, "response_format": {"type": "json_object"}}
    choice = httpx.post(url + "/v1/completions", json=short, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith("{")


@pytest.mark.parametrize(
    "fmt, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "not supported"),
        ({"type": "json_schema"}, "json_schema is given with"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "json_schema is given with"),
    ],
)
def test_bad_response_formats_are_400(server, fmt, message):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                        "response_format": fmt})  # fmt: skip
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_constrained_rows_leave_the_others_alone():
    """In one batch with free rows, the constrained rows write valid JSON and the free rows write what they
    write alone (the mask is all ones for them); a constraint is refused with a draft model."""
    served = tiny_served()
    grammars = Grammars(served.tokenizer, served.cfg.vocab_size, served.stop_ids)
    grammar = grammars.grammar(PERSON)
    steps = DecodeSteps(served.model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(32, 127, n).tolist() for n in (5, 30, 2, 17)]
    stops = served.stop_ids
    engine = Engine(steps, slots=4, chunk=8)
    rs = [
        engine.submit(Request(p, 100, temperature=0.0, stop_ids=stops, constraint=grammars.constraint(grammar) if i % 2 else None))
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    steps_run = 0
    while engine.active:
        engine.step()
        steps_run += 1
    # A constrained row gets a token at every decode step (after 4 prefill chunks of the longest prompt).
    assert steps_run <= max(len(r.tokens) for r in rs) + 6
    for i, (p, r) in enumerate(zip(prompts, rs)):
        if i % 2:
            assert r.finish_reason == "stop" and r.constraint.error == ""
            jsonschema.validate(json.loads(served.tokenizer.decode(r.tokens)), PERSON)
        else:
            alone = Engine(steps, slots=1, chunk=8)
            want = alone.submit(Request(p, 100, temperature=0.0, stop_ids=stops))
            alone.run()
            assert r.tokens == want.tokens
    with pytest.raises(ValueError, match="structured output is not decoded with speculative"):
        Engine(DecodeSteps(served.model, draft="ngram"), slots=1).submit(
            Request([1, 2], 3, constraint=grammars.constraint(grammar))
        )
