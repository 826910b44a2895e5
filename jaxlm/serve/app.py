"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI/Starlette; SSE for streams).

GET /health, GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions. Each of the `n`
choices of a request is one engine request (stream j of the request's seed). Errors are OpenAI's JSON
({"error": {"message", "type", "param", "code"}}) with 400 (bad request), 404 (unknown model or path),
503 (busy: no slot within `queue_timeout`, or the queue is full) and 500 (a failed decode step).

Length: the context is the model's max_seq_len. A prompt that does not leave room for one token, or
prompt + max_tokens beyond the context, is a 400 (`context_length_exceeded`); without max_tokens a chat
completion may use the rest of the context, a text completion 16 tokens (OpenAI's defaults).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from jaxlm.engine import Request
from jaxlm.errors import DataError
from jaxlm.serve.choices import Choice, TextStream
from jaxlm.serve.logprobs import TokenTexts
from jaxlm.serve.model import Served
from jaxlm.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    as_chat,
    describe,
)
from jaxlm.serve.structured import Grammars
from jaxlm.serve.worker import Busy, EngineWorker


class Service:
    """The app's state: the served model, its engine worker, and the rules of admission."""

    def __init__(self, served: Served, worker: EngineWorker, *, queue_timeout: float):
        self.served, self.worker, self.queue_timeout = served, worker, queue_timeout
        self.created = int(time.time())
        self._grammars = None

    @property
    def grammars(self) -> Grammars:
        """Structured output's grammars over the served tokenizer (built when first asked for)."""
        if self._grammars is None:
            self._grammars = Grammars(self.served.tokenizer, self.served.cfg.vocab_size, self.served.stop_ids)
        return self._grammars

    def model_card(self, name: str) -> dict:
        """OpenAI's model object; an adapter's names its base as `parent` (as vLLM lists LoRA adapters)."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "jaxlm"}
        return card if name == self.served.name else {**card, "parent": self.served.name}

    def model_cards(self) -> list[dict]:
        return [self.model_card(n) for n in (self.served.name, *self.served.adapters)]

    def check_model(self, name: str) -> int:
        """The adapter index of model `name` (0: the base); 404 if it is not served."""
        index = self.served.adapter(name)
        if index is None:
            served = ", ".join(f"'{n}'" for n in (self.served.name, *self.served.adapters))
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )
        return index

    def requests(self, body, prompt: list[int], default_max: int | None) -> list[Request]:
        """The n engine requests of one prompt, after the length checks."""
        context, used = self.served.context, len(prompt)
        if not prompt:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        if used >= context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {used}, leaving no room "
                "for a completion",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        limit = body.token_limit if isinstance(body, ChatRequest) else body.max_tokens
        limit = limit if limit is not None else (default_max or context - used)
        if used + limit > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; you requested {used + limit} "
                f"({used} in the prompt, {limit} for the completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if body.n > self.worker.engine.N:
            raise APIError(400, f"n must be at most {self.worker.engine.N} (the server's slots)", param="n")
        seed = secrets.randbits(32) if body.seed is None else body.seed
        chat = isinstance(body, ChatRequest)
        schema = None if body.response_format is None else body.response_format.schema()
        try:
            grammar = None if schema is None else self.grammars.grammar(schema)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None
        adapter = self.check_model(body.model)
        return [
            Request(
                prompt,
                max(1, limit),  # max_tokens 0 (echo): the prompt is scored, the token sampled after it dropped
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=seed,
                stream=j,
                stop_ids=self.served.stop_ids,
                logprobs=body.alternatives if chat else body.logprobs,
                score_prompt=not chat and body.echo and body.logprobs is not None,
                adapter=adapter,
                constraint=None if grammar is None else self.grammars.constraint(grammar),
            )
            for j in range(body.n)
        ]

    async def start(self, requests: list[Request]) -> asyncio.Queue:
        """Submits and waits (bounded) until every request has a slot; 503 if not. Returns the event queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            self.worker.submit(requests, lambda r: loop.call_soon_threadsafe(events.put_nowait, r))
        except Busy as e:
            raise APIError(503, f"server busy: {e}; retry later", type="server_error", code="busy") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        deadline = loop.time() + self.queue_timeout
        while not all(r.admitted or r.done for r in requests):
            try:
                await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self.worker.cancel(requests)
                raise APIError(
                    503,
                    f"server busy: no free slot within {self.queue_timeout:g} s; retry later",
                    type="server_error",
                    code="busy",
                ) from None
        events.put_nowait(None)  # look at the requests again at once: tokens may have come with admission
        return events


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of `service` (kept in `app.state.service`, where the handlers below find it)."""
    app = FastAPI(title="jaxlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
    return app


def _service(http: HTTPRequest) -> Service:
    return http.app.state.service


# Errors, as OpenAI's JSON.


async def api_error(_, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)


async def http_error(_, e: HTTPException):
    kind = "not_found" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)


async def validation_error(_, e):
    return JSONResponse(APIError(400, describe(e)).body(), status_code=400)


async def internal_error(_, e: Exception):
    return JSONResponse(
        APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), status_code=500
    )


# Routes.


async def health(http: HTTPRequest):
    service = _service(http)
    load = service.worker.load
    body = {"model": service.served.name, **load}
    if service.worker.failed is not None:
        body["error"] = service.worker.failed
    return JSONResponse(body, status_code=200 if load["status"] == "ok" else 503)


async def models(http: HTTPRequest):
    return {"object": "list", "data": _service(http).model_cards()}


async def model(http: HTTPRequest, name: str):
    service = _service(http)
    service.check_model(name)
    return service.model_card(name)


async def completions(http: HTTPRequest):
    service = _service(http)
    served = service.served
    body = await parse(http, CompletionRequest)
    try:
        prompts = body.prompts()
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    if body.stream and len(prompts) > 1:
        raise APIError(400, "stream takes one prompt", param="prompt")
    encoded = [p if isinstance(p, list) else served.tokenizer.encode(p) for p in prompts]
    for p in encoded:
        _check_ids(served, p, "prompt")
    groups = [service.requests(body, p, body.max_tokens) for p in encoded]
    return await respond(http, body, groups, encoded, chat=False)


async def chat_completions(http: HTTPRequest):
    service = _service(http)
    body = await parse(http, ChatRequest)
    try:
        prompt = service.served.chat_prompt(body.chat())
    except DataError as e:
        raise APIError(400, str(e), param="messages") from None
    return await respond(http, body, [service.requests(body, prompt, None)], [prompt], chat=True)


async def tokenize(http: HTTPRequest):
    """vLLM's /tokenize (what lm-evaluation-harness's remote tokenizer calls): {"prompt"} or {"messages"}
    (rendered with the chat template) -> {"tokens", "count", "max_model_len"}."""
    service = _service(http)
    body = await parse(http, TokenizeRequest, model_optional=True)
    if body.messages is not None:
        try:
            ids = service.served.chat_prompt(as_chat(body.messages))
        except DataError as e:
            raise APIError(400, str(e), param="messages") from None
    else:
        ids = service.served.tokenizer.encode(body.prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": service.served.context}


async def detokenize(http: HTTPRequest):
    service = _service(http)
    body = await parse(http, DetokenizeRequest, model_optional=True)
    _check_ids(service.served, body.tokens, "tokens")
    return {"prompt": service.served.tokenizer.decode(body.tokens)}


def _check_ids(served: Served, ids: list[int], param: str) -> None:
    if not all(0 <= t < served.cfg.vocab_size for t in ids):
        raise APIError(400, f"token ids must be in [0, {served.cfg.vocab_size})", param=param)


async def tokenizer_info(http: HTTPRequest):
    """The tokenizer's special tokens and chat template (vLLM's /tokenizer_info)."""
    served = _service(http).served
    tokenizer = served.tokenizer
    special = dict(getattr(tokenizer, "special_tokens", {}))
    special.setdefault("eos_token", tokenizer.piece(tokenizer.eos_id))
    return {
        **{k: v for k, v in special.items() if isinstance(v, str)},
        "chat_template": served.template,
        "model_max_length": served.context,
        "vocab_size": served.cfg.vocab_size,
    }


# What the routes share.


async def parse(http: HTTPRequest, kind, model_optional: bool = False):
    """The request body as `kind` (a pydantic model), for the served model; 400 or 404 otherwise."""
    raw = await http.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        raise APIError(400, describe(e)) from None
    if not (model_optional and body.model is None):
        _service(http).check_model(body.model)
    return body


async def respond(http: HTTPRequest, body, groups: list[list[Request]], prompts: list[list[int]], *, chat: bool):
    """Runs the requests (n per prompt) and answers: one JSON body, or a stream of server-sent events."""
    service = _service(http)
    served = service.served
    requests = [r for g in groups for r in g]
    events = await service.start(requests)
    choices = [Choice(r, TextStream(served.tokenizer, body.stops)) for r in requests]
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "created": int(time.time()),
        "model": body.model,  # the base's name or an adapter's
    }
    prompt_tokens = sum(len(p) for p in prompts)  # n choices of one prompt count it once, as OpenAI does
    scoring = not chat and body.max_tokens == 0  # echo only: the token sampled after the prompt is dropped

    def usage():
        done = 0 if scoring else sum(c.seen for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    if body.stream:
        return StreamingResponse(
            stream(http, body, events, choices, head, usage, chat, prompts),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts = ["" for _ in choices]
    try:
        async for i, delta in progress(http, events, choices):
            texts[i] += delta
    finally:
        service.worker.cancel(requests)
    if any(c.finish_reason == "error" for c in choices):
        raise APIError(500, "the decode step failed", type="server_error")
    tokens = TokenTexts(served.tokenizer)
    if chat:
        out = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": _logprobs(tokens, c, chat=True) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, (t, c) in enumerate(zip(texts, choices))
        ]
        return {**head, "object": "chat.completion", "choices": out, "usage": usage()}
    echo = [served.tokenizer.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
    out = []
    for i, (e, t, c) in enumerate(zip(echo, texts, choices)):
        if scoring:
            t, c.seen, c.finish_reason = "", 0, "length"
        lp = None if body.logprobs is None else _logprobs(tokens, c, chat=False, echo=body.echo)
        out.append({"index": i, "text": e + t, "logprobs": lp, "finish_reason": c.finish_reason})
    return {**head, "object": "text_completion", "choices": out, "usage": usage()}


def _logprobs(tokens: TokenTexts, c: Choice, *, chat: bool, echo: bool = False, start: int = 0, offsets=None) -> dict:
    """The logprobs object of the tokens choice c has sent from its `start`-th (after its prompt's, with echo);
    completions' text offsets continue `offsets` (a stream's, across its chunks)."""
    r = c.request
    ids, lps, tops = r.tokens[start : c.seen], r.token_logprobs[start : c.seen], r.top_logprobs[start : c.seen]
    if chat:
        return tokens.chat(ids, lps, tops)
    if echo:
        ids, lps, tops = r.prompt + ids, r.prompt_logprobs + lps, r.prompt_top_logprobs + tops
    return tokens.completion(ids, lps, tops, offsets)


async def progress(http: HTTPRequest, events: asyncio.Queue, choices: list[Choice]) -> AsyncIterator[tuple[int, str]]:
    """(choice index, text delta) until every choice is over; cancels them if the client goes away."""
    worker = _service(http).worker
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while any(c.finish_reason is None for c in choices):
        try:
            await asyncio.wait_for(events.get(), 0.5)
        except TimeoutError:
            pass
        if loop.time() - checked >= 0.5:  # also while tokens flow: a client that gave up frees its slot
            if await http.is_disconnected():
                return
            checked = loop.time()
        for i, c in enumerate(choices):
            if c.finish_reason is None:
                delta = c.advance()
                if c.finish_reason is not None and not c.request.done:
                    worker.cancel([c.request])  # a stop sequence ended it
                if delta or c.finish_reason is not None:
                    yield i, delta


async def stream(http: HTTPRequest, body, events, choices, head, usage, chat, prompts) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ending with [DONE]."""
    service = _service(http)
    kind = "chat.completion.chunk" if chat else "text_completion"

    tokens = TokenTexts(service.served.tokenizer)
    sent = [0] * len(choices)  # tokens whose log-probabilities each choice has sent
    offsets = [tokens.offsets() for _ in choices]  # completions' text_offset, across each choice's chunks

    def logprobs(i):
        if body.logprobs in (None, False):
            return None
        start, sent[i] = sent[i], choices[i].seen
        return _logprobs(tokens, choices[i], chat=chat, start=start, offsets=offsets[i])

    def chunk(i, delta=None, finish=None, text=""):
        lp = logprobs(i) if choices[i].seen > sent[i] or finish else None
        if chat:
            choice = {"index": i, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        for i in range(len(choices)):
            if chat:
                yield chunk(i, {"role": "assistant", "content": ""})
            elif body.echo:
                echoed = service.served.tokenizer.decode(prompts[0])
                offsets[i] = tokens.offsets(len(echoed))  # the tokens' text follows the echoed prompt
                yield chunk(i, text=echoed)
        async for i, delta in progress(http, events, choices):
            finish = choices[i].finish_reason
            if finish == "error":
                err = APIError(500, "the decode step failed", type="server_error").body()
                yield f"data: {json.dumps(err)}\n\n"
                return
            if delta:
                yield chunk(i, {"content": delta}, text=delta)
            if finish is not None:
                yield chunk(i, finish=finish)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        service.worker.cancel([c.request for c in choices])
