"""Exact match on instruction data: the model answers each held-out prompt greedily (KV cache, adapters
applied), and the answer counts when it equals the reference up to surrounding whitespace.

A prompt/completion example is asked its prompt and compared with its completion; a chat example is asked
everything before its last assistant turn (rendered with the generation prompt) and compared with that turn.
Generation stops at the end-of-text token or the template's end-of-turn token.
"""

from __future__ import annotations

from jaxlm.data.chat import read_template, render, stop_ids
from jaxlm.generate import Generator


def prompt_and_answer(ex: dict, tokenizer, template: str | None) -> tuple[list[int], str]:
    """(prompt token ids, reference answer) of an instruction example."""
    if "messages" not in ex:
        return tokenizer.encode(ex["prompt"]), ex["completion"]
    msgs = ex["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    special = getattr(tokenizer, "special_tokens", {})
    text = render(template, msgs[:last], add_generation_prompt=True, **special)
    return tokenizer.encode(text), msgs[last]["content"]


def _same(answer: str, reference: str) -> bool:
    return " ".join(answer.split()) == " ".join(reference.split())


def exact_match(
    model,
    tokenizer,
    examples: list[dict],
    *,
    chat_template: str = "auto",
    batch_size: int = 32,
    extra_tokens: int = 4,
    prefix_lm: bool = False,
) -> dict:
    """{"exact_match": fraction, "n", "by_task": {task: fraction}, "samples": first few (prompt, answer, ref)}.

    Each batch generates up to its longest reference plus `extra_tokens` tokens. prefix_lm: the prompt is
    attended bidirectionally, as a train.objective=prefix_lm model was trained.
    """
    if not examples:
        raise ValueError("exact match needs at least one example")
    template = read_template(chat_template, tokenizer) if any("messages" in e for e in examples) else None
    asked = [prompt_and_answer(e, tokenizer, template) for e in examples]
    generator = Generator(model, prefix_lm=prefix_lm)
    hits, rows = [], []
    order = sorted(range(len(asked)), key=lambda i: len(asked[i][0]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        budget = max(len(tokenizer.encode(asked[i][1])) for i in chunk) + extra_tokens
        prompts = [asked[i][0] for i in chunk]
        outs = generator.generate(prompts, max_new_tokens=budget, temperature=0.0, stop_ids=stop_ids(tokenizer))
        for i, out in zip(chunk, outs):
            answer = tokenizer.decode(out)
            hits.append((i, _same(answer, asked[i][1])))
            rows.append((i, answer))
    by_index, answers = dict(hits), dict(rows)
    tasks = {}
    for i, e in enumerate(examples):
        tasks.setdefault(e.get("task", "all"), []).append(by_index[i])
    return {
        "exact_match": sum(by_index.values()) / len(examples),
        "n": len(examples),
        "by_task": {t: sum(v) / len(v) for t, v in sorted(tasks.items())},
        "samples": [
            {"prompt": tokenizer.decode(asked[i][0]), "answer": answers[i], "reference": asked[i][1]}
            for i in range(min(3, len(examples)))
        ],
    }
