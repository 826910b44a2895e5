"""Real clients against `jaxlm serve`'s app: the official openai package (sync, async, streaming) and
LangChain's ChatOpenAI. Outputs are checked against the engine's own greedy generation."""

import asyncio

import openai
import pytest

from jaxlm.generate import Generator


def greedy(service, prompt_ids, n):
    served = service.served
    out = Generator(served.model).generate([prompt_ids], max_new_tokens=n, temperature=0.0, stop_ids=[256])[0]
    return served.tokenizer.decode(out)


def chat_ids(service, text):
    return service.served.chat_prompt([{"role": "user", "content": text}])


def test_models_and_health(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "jaxlm"
    import httpx

    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_openai_sync_completion_chat_and_stream(server):
    url, service = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    done = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=12, temperature=0)
    assert done.choices[0].text == greedy(service, list(b"ROMEO."), 12)
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (6, 12)

    messages = [{"role": "user", "content": "Who is there?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    want = greedy(service, chat_ids(service, "Who is there?"), 10)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(chat_ids(service, "Who is there?"))

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10

    streamed = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_openai_async_concurrent_requests_each_get_their_own_answer(server):
    """More concurrent requests than slots, of different prompts: each equals its greedy output alone."""
    url, service = server
    prompts = ["To be", "or not", "to be, that is the question", "A", "Whether 'tis nobler", "in the mind"]

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        calls = [client.completions.create(model="tiny", prompt=p, max_tokens=9, temperature=0) for p in prompts]
        chats = [
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": p}], max_tokens=7, temperature=0, stream=True
            )
            for p in prompts[:3]
        ]
        done = await asyncio.gather(*calls)
        streams = await asyncio.gather(*chats)
        texts = []
        for s in streams:
            texts.append("".join([c.choices[0].delta.content or "" async for c in s if c.choices]))
        await client.close()
        return done, texts

    done, texts = asyncio.run(main())
    for p, d in zip(prompts, done):
        assert d.choices[0].text == greedy(service, list(p.encode()), 9)
    for p, t in zip(prompts, texts):
        assert t == greedy(service, chat_ids(service, p), 7)


def test_n_seed_and_stop(server):
    url, service = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    kw = dict(model="tiny", prompt="Hark", max_tokens=16, temperature=1.0, top_p=0.9, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.prompt_tokens == 4 and a.usage == b.usage
    ended = [c.finish_reason for c in a.choices]  # at the token limit or at end-of-text
    assert set(ended) <= {"length", "stop"} and (a.usage.completion_tokens == 48) == (set(ended) == {"length"})
    full = greedy(service, list(b"Hark"), 16)
    stop = full[5:7]
    cut = client.completions.create(model="tiny", prompt="Hark", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_langchain_chat_openai(server):
    from langchain_openai import ChatOpenAI

    url, service = server
    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=8)
    want = greedy(service, chat_ids(service, "Good morrow"), 8)
    assert llm.invoke("Good morrow").content == want
    assert "".join(c.content for c in llm.stream("Good morrow")) == want


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_above_context_is_a_clear_400(server, stream):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model="tiny", prompt="x", max_tokens=500, stream=stream)


def test_speculative_serving_gives_the_same_greedy_text():
    """`jaxlm serve --draft ngram`: the same greedy completions, fewer model steps, stats in /health."""
    import httpx

    from jaxlm.serve.server import build_service, running
    from tests.serve.conftest import tiny_served

    served = tiny_served()
    service = build_service(served, slots=2, chunk=16, draft="ngram", draft_tokens=3)
    prompts = ["abcabcabcabc", "To be or not to be"]
    with running(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        got = [client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0) for p in prompts]
        health = httpx.get(url + "/health").json()
    for p, g in zip(prompts, got):
        assert g.choices[0].text == greedy(service, list(p.encode()), 40)
    assert health["speculative"]["drafted"] > 0
