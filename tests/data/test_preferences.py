"""Preference pairs: reading and checking JSONL, encoding text and chat pairs, rows, the embedded set."""

import json
import logging

import numpy as np
import pytest

from jaxlm.data.chat import CHATML
from jaxlm.data.corpus import VAL_WORKS, embedded_works
from jaxlm.data.preferences import check_pair, encode_pair, pair_rows, read_preferences
from jaxlm.data.shakespeare_instructions import speeches
from jaxlm.data.shakespeare_preferences import preference_splits
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.errors import DataError


def _write(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines))
    return path


@pytest.mark.parametrize(
    "pair,message",
    [
        ({"prompt": "Q", "chosen": "a"}, "missing \\['rejected'\\]"),
        ({"chosen": "a", "rejected": "b"}, "missing \\['prompt'\\]"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
        ({"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen is empty"),
        ({"prompt": "Q", "chosen": ["a"], "rejected": "b"}, "text completions"),
        ({"prompt": [], "chosen": [], "rejected": []}, "empty list of messages"),
        ({"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}, "message-list"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [],
            },
            "role must be assistant",
        ),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "text or a list of messages"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_pairs_name_the_problem(pair, message):
    with pytest.raises(DataError, match=message):
        check_pair(pair, "f.jsonl:3")


def test_read_names_file_and_line(tmp_path):
    good = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
    assert read_preferences(_write(tmp_path / "a.jsonl", [good, b"", good])) == [good, good]
    with pytest.raises(DataError, match="b.jsonl:2: not valid JSON"):
        read_preferences(_write(tmp_path / "b.jsonl", [good, b"{oops"]))
    with pytest.raises(DataError, match="c.jsonl:1: not valid UTF-8"):
        read_preferences(_write(tmp_path / "c.jsonl", [b'{"prompt": "\xff"}']))
    with pytest.raises(DataError, match="d.jsonl:2: .* missing \\['chosen'\\]"):
        read_preferences(_write(tmp_path / "d.jsonl", [good, {"prompt": "Q", "rejected": "x"}]))
    with pytest.raises(DataError, match="holds no pairs"):
        read_preferences(_write(tmp_path / "e.jsonl", [b""]))
    with pytest.raises(DataError, match="cannot read"):
        read_preferences(tmp_path / "missing.jsonl")


def test_rows_mark_completions_and_pad():
    tok = ByteTokenizer()
    pairs = [
        {"prompt": "Who? ", "chosen": "Romeo", "rejected": "Iago!"},
        {"prompt": "多少", "chosen": "一", "rejected": "二"},
    ]
    encoded = [encode_pair(p, tok, None, eos=True) for p in pairs]
    rows = pair_rows(encoded, seq_len=16)
    assert rows["tokens"].shape == (2, 2, 16)
    assert tok.decode(rows["tokens"][0, 0][rows["mask"][0, 0]].tolist()[:-1]) == "Romeo"
    assert rows["tokens"][0, 1][rows["mask"][0, 1]].tolist()[-1] == tok.eos_id
    assert tok.decode(rows["tokens"][0, 1][rows["valid"][0, 1] & ~rows["mask"][0, 1]].tolist()) == "Who? "
    assert rows["valid"][1, 0].sum() == len("多少".encode()) + len("一".encode()) + 1
    no_eos = pair_rows([encode_pair(pairs[0], tok, None, eos=False)], seq_len=16)
    assert tok.decode(no_eos["tokens"][0, 0][no_eos["valid"][0, 0]].tolist()) == "Who? Romeo"


def test_too_long_keeps_the_prompt_end_and_completion_start():
    p, c, r = list(range(10, 30)), [1, 2, 3, 4], [5, 6]
    rows = pair_rows([(p, c, r)], seq_len=12)
    assert rows["tokens"][0, 0].tolist() == p[-8:] + c
    assert rows["tokens"][0, 1, :10].tolist() == p[-8:] + r
    long_c = list(range(100, 120))
    rows = pair_rows([(p, long_c, r)], seq_len=12)  # the prompt keeps at least half the row
    assert rows["tokens"][0, 0].tolist() == p[-6:] + long_c[:6]
    with pytest.raises(DataError, match="no preference pair fits"):
        pair_rows([(p, c, r)], seq_len=12, too_long="drop")


def test_identical_completions_are_left_out_and_counted(caplog):
    with caplog.at_level(logging.WARNING):
        rows = pair_rows([([1, 2], [3], [3]), ([1, 2], [3], [4]), ([5], [6, 7], [6, 7])], seq_len=8)
    assert len(rows["tokens"]) == 1
    assert "2 pairs have identical chosen and rejected completions" in caplog.text


def test_chat_pairs_render_with_the_template():
    from jaxlm.data.chat import CHATML_TOKENS
    from jaxlm.data.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["Who? Romeo. Iago. The assistant and the user."] * 20, 300)
    tok.add_special_tokens(CHATML_TOKENS)
    pair = {
        "prompt": [{"role": "user", "content": "Who?"}],
        "chosen": [{"role": "assistant", "content": "Romeo"}],
        "rejected": [{"role": "assistant", "content": "Iago"}],
    }
    p, c, r = encode_pair(pair, tok, CHATML, eos=True)
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert p.count(start) == 2 and p.count(end) == 1 and tok.decode(p).endswith("assistant\n")  # decode drops specials
    assert c.count(end) == 1 and r.count(end) == 1 and start not in c + r
    assert tok.decode(c).startswith("Romeo") and tok.decode(r).startswith("Iago")
    with pytest.raises(DataError, match="chat template"):
        encode_pair(pair, tok, None, eos=True)


def test_embedded_set_is_deterministic_and_judged_by_the_passage():
    train, val = preference_splits()
    assert (train, val) == preference_splits() and len(train) > 5000 and len(val) == 360
    works = embedded_works()
    val_names = {who for w in VAL_WORKS for who, _ in speeches(works[w])}
    for p in val:
        assert p["chosen"] != p["rejected"] and p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        if p["task"] != "next_line":
            assert p["chosen"].strip() in p["prompt"] and p["rejected"].strip() not in p["prompt"]
            assert p["rejected"].strip() in val_names  # wrong answers of held-out pairs come from held-out plays
    tasks = {p["task"] for p in train}
    assert tasks == {"speaker", "first", "next_line"}
    assert np.mean([p["rejected"].strip() in p["prompt"] for p in train]) < 0.02
