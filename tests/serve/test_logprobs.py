"""Log-probabilities over HTTP: completions (logprobs, echo, max_tokens 0: lm-evaluation-harness's scoring
request), chat (logprobs, top_logprobs; streamed too), and the tokenizer endpoints. Each value is checked
against the model's own forward pass."""

import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from jaxlm.serve.logprobs import TokenTexts


def log_softmax(served, ids):
    """(len(ids) - 1, V): row j is log p(. | ids[: j + 1])."""
    logits = served.model(jnp.asarray([ids]))[0][0]
    return np.asarray(jax.nn.log_softmax(logits))[:-1]


def test_echo_scores_every_prompt_token(server):
    url, service = server
    served = service.served
    ids = served.tokenizer.encode("To be, or not to be: that is the question.")
    body = {"model": "tiny", "prompt": "To be, or not to be: that is the question.", "echo": True}
    got = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 0, "logprobs": 2}, timeout=60).json()
    (choice,) = got["choices"]
    assert choice["text"] == served.tokenizer.decode(ids) and choice["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    lsm = log_softmax(served, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], lsm[np.arange(len(ids) - 1), ids[1:]], atol=2e-5)
    assert lp["tokens"] == [served.tokenizer.decode([i]) for i in ids]  # ASCII: each byte its own character
    assert lp["text_offset"] == list(range(len(ids)))
    for j, top in enumerate(lp["top_logprobs"][1:]):
        best = np.argsort(-lsm[j], kind="stable")[:2]
        expected = {TokenTexts(served.tokenizer).text(int(t)): float(lsm[j, t]) for t in best}
        expected.setdefault(lp["tokens"][j + 1], lp["token_logprobs"][j + 1])  # the prompt token, as OpenAI adds it
        assert top.keys() == expected.keys()
        np.testing.assert_allclose([top[k] for k in expected], list(expected.values()), atol=2e-5)


def test_lm_eval_style_batch_of_token_prompts(server):
    """lm-evaluation-harness's loglikelihood request: token-id prompts (context + continuation), echo,
    logprobs 1, max_tokens 1, greedy; it reads token_logprobs[ctxlen:-1] and compares each with the top value."""
    url, service = server
    served = service.served
    prompts = [[72, 101, 108, 108, 111, 32, 119], [84, 104, 101, 32, 113, 117, 105, 99, 107]]
    body = {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    for p, choice in zip(prompts, sorted(got["choices"], key=lambda c: c["index"])):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(p) + 1  # the prompt, then the one generated token
        lsm = log_softmax(served, p)
        np.testing.assert_allclose(lp["token_logprobs"][1:-1], lsm[np.arange(len(p) - 1), p[1:]], atol=2e-5)
        for j, (tok, top) in enumerate(zip(lp["token_logprobs"][1:-1], lp["top_logprobs"][1:-1])):
            assert (tok == max(top.values())) == (p[j + 1] == int(np.argmax(lsm[j])))  # lm-eval's is_greedy
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy: the top token


def test_generated_tokens_logprobs_and_chat(server):
    url, service = server
    served = service.served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    got = client.completions.create(model="tiny", prompt="ROMEO.", max_tokens=6, temperature=0.7, seed=3, logprobs=3)
    lp = got.choices[0].logprobs
    prompt = served.tokenizer.encode("ROMEO.")
    # The byte tokenizer: a token is one byte, shown as its character or as bytes:\xNN.
    generated = [int(t[len("bytes:\\x") :], 16) if t.startswith("bytes:") else t.encode()[0] for t in lp.tokens]
    assert len(generated) == got.usage.completion_tokens
    lsm = log_softmax(served, prompt + generated)[len(prompt) - 1 :]
    np.testing.assert_allclose(lp.token_logprobs, lsm[np.arange(len(generated)), generated], atol=2e-5)
    assert all(len(top) in (3, 4) for top in lp.top_logprobs)  # the top 3, and the sampled token if not among them

    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob  # greedy: the top token
    streamed = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    parts = [c for chunk in streamed for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, c.logprob) for c in parts] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_tokenizer_endpoints(server):
    url, service = server
    tokenizer = service.served.tokenizer
    ids = httpx.post(url + "/tokenize", json={"prompt": "héllo"}).json()
    assert ids["tokens"] == tokenizer.encode("héllo") and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == service.served.context
    back = httpx.post(url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == "héllo"
    chat = httpx.post(url + "/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert chat.json()["tokens"] == service.served.chat_prompt([{"role": "user", "content": "x"}])
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] and info["chat_template"] == service.served.template


@pytest.mark.parametrize("text", ["naïve café", "日本語"])
def test_token_strings_of_split_characters(server, text):
    """A byte-level token that is part of a character is written bytes:\\xNN (OpenAI's form); the offsets
    point at characters."""
    url, _ = server
    body = {"model": "tiny", "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0}
    lp = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    raw = text.encode()
    assert len(lp["tokens"]) == len(raw)
    assert all(t == chr(b) if b < 128 else t == f"bytes:\\x{b:02x}" for t, b in zip(lp["tokens"], raw))
    assert lp["text_offset"][-1] == len(text) - 1


@pytest.mark.parametrize("raw", ["日本語 ok".encode(), b"\xeb\xcc\x0c\x92\x02\x9a\x02\xf6", b"a\xe6\x97"])
@pytest.mark.parametrize("cut", [1, 2, 3, 5])
def test_text_offsets_carry_split_characters_across_chunks(server, raw, cut):
    """Offsets over a stream's chunks equal those over the whole: a character (or an invalid byte, one
    U+FFFD) whose bytes straddle a chunk boundary starts where its first byte's token does."""
    texts = TokenTexts(server[1].served.tokenizer)
    ids = list(raw)  # the test tokenizer's byte tokens
    assert [texts.bytes(i) for i in ids] == [bytes([b]) for b in raw]
    whole = texts.offsets()(ids)
    chunked = texts.offsets()
    assert [o for j in range(0, len(ids), cut) for o in chunked(ids[j : j + cut])] == whole
    assert whole[-1] <= len(raw.decode("utf-8", errors="replace"))


def test_streamed_completion_logprobs_add_up_to_the_whole(server):
    """Each chunk carries the log-probabilities of its tokens; joined, they are the non-streamed object, text
    offsets included (they count from the start of the whole text)."""
    url, _ = server
    body = {"model": "tiny", "prompt": "ROMEO.", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[len("data: ") :])["choices"][0]["logprobs"]
                for k in joined if lp else ():
                    joined[k] += lp[k]
    assert len(whole["tokens"]) == 8 and joined == whole
