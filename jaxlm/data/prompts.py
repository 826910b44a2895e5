"""Prompts for reinforcement learning (ppo, grpo): what the policy answers, and the fields its reward reads.

A JSONL line is `{"prompt": text | [messages], ...}` (TRL's prompt-only format) or `{"messages": [...]}`, whose
trailing assistant turns are dropped (the policy writes its own). Chat prompts are rendered with the chat
template and its generation prompt. Every other field (e.g. a reference `completion`, a `task`) is passed to a
Python reward function as a keyword argument of the same name, one value per prompt.
"""

from __future__ import annotations

from pathlib import Path

from jaxlm.data.chat import render
from jaxlm.data.jsonl import read_records
from jaxlm.errors import DataError


def read_prompts(path: str | Path) -> list[dict]:
    """Checked prompt records of a JSONL file; DataError naming the file and line of the first bad one."""
    return read_records(path, check_prompt, "prompt", "prompts")


def check_prompt(ex, where: str) -> dict:
    if not isinstance(ex, dict):
        raise DataError(f"{where}: a prompt record is a JSON object, got {type(ex).__name__}")
    prompt = ex.get("prompt", ex.get("messages"))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        return ex
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs a string role and a string content, got {m!r}")
        if all(m["role"] == "assistant" for m in prompt):
            raise DataError(f"{where}: the prompt has only assistant messages: nothing to answer")
        return ex
    raise DataError(f'{where}: expected "prompt" (text or messages) or "messages", got keys {sorted(ex)}')


def prompt_messages(ex: dict) -> str | list[dict]:
    """The prompt as text, or as messages without trailing assistant turns."""
    if "prompt" in ex:
        return ex["prompt"]
    msgs = list(ex["messages"])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def encode_prompt(ex: dict, tokenizer, template: str | None) -> list[int]:
    prompt = prompt_messages(ex)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if template is None:
        raise DataError("a chat prompt needs a chat template")
    return tokenizer.encode(
        render(template, prompt, add_generation_prompt=True, **getattr(tokenizer, "special_tokens", {}))
    )


def reward_fields(examples: list[dict]) -> dict[str, list]:
    """The records' other fields, as reward-function keyword arguments (a field some lack gets None there)."""
    keys = sorted({k for e in examples for k in e} - {"prompt", "messages"})
    return {k: [e.get(k) for e in examples] for k in keys}
