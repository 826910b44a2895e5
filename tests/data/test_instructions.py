"""Instruction data: JSONL errors, chat templates as transformers renders them, loss masks, packing."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.data.chat import CHATML, render
from jaxlm.data.instructions import encode_example, pack, read_jsonl
from jaxlm.data.shakespeare_instructions import instruction_splits, play_examples
from jaxlm.data.tokenizer import ByteTokenizer, DataError
from jaxlm.nn.models import build_model
from jaxlm.ops.losses import cross_entropy
from tests.parity import require

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who wrote Hamlet? 谁"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "When?"},
    {"role": "assistant", "content": "About 1600."},
]}  # fmt: skip


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": [{"role": "user"}]}', "messages\\[0\\] needs a string role and a string content"),
        (b'{"prompt": "a"}', "expected"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        (b'{"prompt": "\xff", "completion": "x"}', "not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n' + line + b"\n")
    with pytest.raises(DataError, match=f"data.jsonl:2: .*{problem}"):
        read_jsonl(path)


def test_chatml_loss_covers_assistant_turns_only():
    tok = ByteTokenizer()
    ids, scored = encode_example(CHAT, tok, CHATML)
    text = tok.decode(ids)
    assert text == render(CHATML, CHAT["messages"])
    picked = tok.decode([i for i, s in zip(ids, scored) if s])
    assert picked == "Shakespeare.<|im_end|>\nAbout 1600.<|im_end|>\n"


def test_template_renders_as_transformers():
    require("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] | trim }}<</SYS>>"
        "{% elif loop.index0 % 2 == 1 %}[INST] {{ m['content'] }} [/INST]{% else %} {% generation %}{{ m['content'] }}"
        "{% endgeneration %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}"
    )
    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", chat_template=template)
    for gen in (False, True):
        want = hf.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=gen)
        got = render(template, CHAT["messages"], add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
        assert got == want


def _encoded(n=12):
    tok = ByteTokenizer()
    train, _ = instruction_splits()
    examples = [dict(e, prompt=e["prompt"][-40:]) for e in train[:n]]  # short prompts: a few per row
    return [encode_example(e, tok, None) for e in examples]


def test_packed_loss_equals_one_example_per_row():
    encoded = _encoded()
    cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=256)
    model = build_model(cfg, rngs=nnx.Rngs(0))

    def loss(rows):
        logits, _ = model(rows["inputs"], rows["positions"], rows["valid"], segments=rows.get("segments"))
        total, count = cross_entropy(logits, rows["targets"], rows["mask"])
        return float(total), float(count)

    packed = pack(encoded, seq_len=256, pack=True, too_long="truncate", seed=0)
    single = pack(encoded, seq_len=256, pack=False, too_long="truncate", seed=0)
    assert len(packed["inputs"]) < len(single["inputs"]) == len(encoded)
    a, b = loss(packed), loss(single)
    assert a[1] == b[1]
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)


def test_perturbing_one_packed_example_leaves_the_others():
    encoded = _encoded(6)
    cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=256)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    rows = pack(encoded, seq_len=256, pack=True, too_long="truncate", seed=0)
    seg = rows["segments"][0]
    assert seg.max() >= 2
    changed = dict(rows, inputs=np.where(seg == 1, (rows["inputs"] + 7) % 256, rows["inputs"]))
    run = lambda r: np.asarray(model(r["inputs"], r["positions"], r["valid"], segments=r["segments"])[0])  # noqa: E731
    a, b = run(rows)[0], run(changed)[0]
    others = seg >= 2
    np.testing.assert_array_equal(a[others], b[others])
    assert np.abs(a[seg == 1] - b[seg == 1]).max() > 0


def test_too_long_policy():
    ids, scored = np.arange(40, dtype=np.int32), np.arange(40) >= 30
    kept = pack([(ids, scored)], seq_len=35, pack=True, too_long="truncate", seed=0)
    assert kept["mask"].sum() == 6  # truncated to 36 tokens (0..35): targets 30..35 scored
    with pytest.raises(DataError, match="no instruction example fits"):
        pack([(ids, scored)], seq_len=35, pack=True, too_long="drop", seed=0)
    with pytest.raises(DataError, match="no instruction example fits"):  # truncation left nothing to score
        pack([(ids, scored)], seq_len=20, pack=True, too_long="truncate", seed=0)


def test_embedded_set_is_deterministic_and_held_out():
    train, val = instruction_splits()
    assert len(train) > 3000 and len(val) >= 300
    assert {e["task"] for e in val} == {"speaker", "first", "next_line"}
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in val}
    assert all(e["completion"].strip() in e["prompt"] for e in val)  # answerable from the prompt
    play_examples.cache_clear()  # built again from the corpus: the same set
    assert json.dumps(instruction_splits()) == json.dumps((train, val))
