"""The OpenAI API's request bodies (the fields jaxlm serves), validated strictly: an unknown field, a wrong
type or an unsupported option is a 400 that names it, not a silent default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jaxlm.engine.steps import TOP_LOGPROBS


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with (and only with) type json_schema")
        return self

    def schema(self) -> dict | None:
        """The JSON schema the output must follow (json_object: any object), or None for free text."""
        if self.type == "text":
            return None
        return {"type": "object"} if self.type == "json_object" else self.json_schema.schema_


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM has it too): 0 = off
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Accepted only at their neutral values: jaxlm does not implement them.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None  # chat in OpenAI's API; completions too, as vLLM has it

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions; 0 with echo: scoring
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    suffix: None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _prompt(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only for echo (scoring the prompt)")
        if self.stream and self.echo and (self.logprobs is not None or self.max_tokens == 0):
            raise ValueError("echo with logprobs or max_tokens 0 is not supported when streaming")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    tools: None = None
    tool_choice: None = None
    parallel_tool_calls: bool | None = None
    metadata: dict | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _options(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def alternatives(self) -> int | None:
        """The engine's logprobs setting: None, or the top alternatives listed."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        return as_chat(self.messages)


def as_chat(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them (a developer message is a system message)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False  # accepted: jaxlm's tokenizers add none

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def describe(error) -> str:
    """pydantic's ValidationError as one line: 'field.path: problem; ...'."""
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
