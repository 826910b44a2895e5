"""Prompt records for ppo/grpo and the embedded verse prompts."""

import json

import pytest

from jaxlm.data.chat import CHATML
from jaxlm.data.prompts import encode_prompt, prompt_messages, read_prompts, reward_fields
from jaxlm.data.shakespeare_instructions import verse_splits
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import DataError


def test_read_and_check(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "old answer"}]}
    path.write_text("\n".join(json.dumps(x) for x in ({"prompt": "Q", "task": "t"}, chat)) + "\n")
    text, conv = read_prompts(path)
    assert prompt_messages(text) == "Q" and prompt_messages(conv) == [{"role": "user", "content": "Hi"}]
    assert reward_fields([text, conv]) == {"task": ["t", None]}
    tok = ByteTokenizer()
    assert tok.decode(encode_prompt(text, tok, None)) == "Q"
    assert tok.decode(encode_prompt(conv, tok, CHATML)).endswith("assistant\n")
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(conv, tok, None)
    bad = [
        (b"[1]", "JSON object"),
        (b'{"prompt": " "}', "prompt is empty"),
        (b'{"other": 1}', 'expected "prompt"'),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', "only assistant"),
        (b'{"prompt": [{"role": 1}]}', "message 0"),
        (b"\xff", "UTF-8"),
        (b"{", "not valid JSON"),
    ]
    for line, message in bad:
        path.write_bytes(line)
        with pytest.raises(DataError, match=message):
            read_prompts(path)
    path.write_bytes(b"\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(path)


def test_verse_prompts_are_deterministic_and_split_by_play():
    train, val = verse_splits()
    assert (train, val) == verse_splits() and len(train) > 1000 and len(val) == 80
    e = val[0]
    assert e["prompt"].count("\n") == 2 and e["prompt"].split("\n")[0].endswith(".") and e["task"] == "verse"
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in val}
