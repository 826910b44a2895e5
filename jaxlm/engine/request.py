"""A request to the engine, the check of its sampling settings, and its own PRNG stream."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to continue. The engine fills `tokens` (generated, stop token excluded) and, when the
    request leaves, `finish_reason`: "stop" (a stop token, kept in `stop_token`), "length" or "cancelled".

    logprobs: None, or k in [0, 20]: each generated token's log-probability under the model's distribution
    (before temperature, top-k and top-p) goes to `token_logprobs`, and the k most likely tokens there, as
    (id, log-probability) pairs, to `top_logprobs`. score_prompt (with logprobs): the same for every prompt
    token after the first (`prompt_logprobs`, `prompt_top_logprobs`, their first entry None); the prompt is
    then kept whole (at most max_seq_len - 1 tokens), not cut to the refill window.

    adapter: with LoRA banks (multi-LoRA serving), 0 for the base model or i for the i-th adapter.
    constraint: structured output, or None: an object whose `fill(words)` writes into `words` ((W,) int32, bit
    j of word w for token 32·w + j) the tokens the request may sample next, and `accept(token)` advances it
    past a sampled token (`jaxlm.serve.structured.TokenConstraint`). Its next mask depends on its last token,
    so while a constrained row runs, the engine reads each decode step's tokens before dispatching the next.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0  # a second seed: the rows of one call, the choices of one HTTP request
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    score_prompt: bool = False
    adapter: int = 0
    constraint: object | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_token: int | None = None
    prompt_tokens: int = 0  # the prompt tokens kept (a prompt longer than the window keeps its end)
    admitted: bool = False  # has had a slot
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the bad sampling setting, before anything is traced."""
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def request_key(seed, stream, count):
    """The key of the `count`-th token of a request: the same whatever else is in the batch."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), count)
