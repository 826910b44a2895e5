"""Exact match: prompts as training saw them, greedy answers cut at end-of-text / end-of-turn, whitespace-blind."""

from jaxlm.data.chat import CHATML
from jaxlm.data.tokenizer import BPETokenizer
from jaxlm.train.exact_match import exact_match, prompt_and_answer


def test_prompt_and_answer_for_both_formats(corpus_file):
    tok = BPETokenizer.train([corpus_file.read_text(encoding="utf-8")], 300)
    ids, ref = prompt_and_answer({"prompt": "Who speaks?", "completion": " ROMEO"}, tok, None)
    assert tok.decode(ids) == "Who speaks?" and ref == " ROMEO"
    chat = {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "ROMEO"}]}
    ids, ref = prompt_and_answer(chat, tok, CHATML)
    assert tok.decode(ids) == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n" and ref == "ROMEO"


def test_exact_match_stops_at_the_stop_tokens_and_ignores_surrounding_space(monkeypatch, corpus_file):
    tok = BPETokenizer.train([corpus_file.read_text(encoding="utf-8")], 300)
    tok.add_special_tokens(["<|im_end|>"])
    end = tok.token_id("<|im_end|>")
    said = {"A?": tok.encode(" ROMEO") + [tok.eos_id] + tok.encode("junk"), "B?": tok.encode("JULIET") + [end, 5]}
    said["C?"] = tok.encode(" ROMEO and more")  # never stops: the extra words count against it
    asked = []

    class Answers:
        def __init__(self, model, prefix_lm):
            assert prefix_lm is False
            pass

        def generate(self, prompts, *, max_new_tokens, temperature, stop_ids):
            assert temperature == 0.0 and stop_ids == {tok.eos_id, end}  # end of text and of turn
            asked.append(max_new_tokens)
            rows = [said[tok.decode(p)] for p in prompts]
            return [row[: next((k for k, t in enumerate(row) if t in stop_ids), len(row))] for row in rows]

    monkeypatch.setattr("jaxlm.train.exact_match.Generator", Answers)
    examples = [
        {"prompt": "A?", "completion": "ROMEO ", "task": "who"},
        {"prompt": "B?", "completion": " JULIET", "task": "who"},
        {"prompt": "C?", "completion": " ROMEO", "task": "next"},
    ]
    em = exact_match(None, tok, examples, batch_size=8, extra_tokens=4)
    assert em["n"] == 3 and abs(em["exact_match"] - 2 / 3) < 1e-9
    assert em["by_task"] == {"next": 0.0, "who": 1.0}
    assert asked == [max(len(tok.encode(e["completion"])) for e in examples) + 4]
    assert [s["answer"] for s in em["samples"]] == [" ROMEO", "JULIET", " ROMEO and more"]
