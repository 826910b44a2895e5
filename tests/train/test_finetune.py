"""Fine-tuning end to end through the CLI: pretrain a tiny run, fine-tune it on chat JSONL with each PEFT
method, then eval (loss and exact match), generate and resume load the adapter on its base."""

import json

import pytest

from jaxlm.cli import main
from jaxlm.train.run_dir import load_run


def _chat(path, n):
    names = ["ROMEO", "JULIET", "HAMLET", "OPHELIA"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            who = names[i % 4]
            msgs = [{"role": "user", "content": f"{who}. Hello there, friend {i}. Who speaks?"}]
            f.write(json.dumps({"messages": [*msgs, {"role": "assistant", "content": who}], "task": "who"}) + "\n")


@pytest.mark.parametrize("method", ["none", "lora", "prefix"])
def test_finetune_eval_generate(pretrained, tmp_path, method, capsys):
    _chat(tmp_path / "train.jsonl", 48)
    _chat(tmp_path / "val.jsonl", 24)
    run = tmp_path / "ft"
    config = tmp_path / "ft.yaml"
    config.write_text(f"finetune:\n  init_from: {pretrained}\npeft:\n  method: {method}\n")
    overrides = [f"data.source={tmp_path / 'train.jsonl'}", f"data.val_source={tmp_path / 'val.jsonl'}"]
    overrides += ["train.objective=sft", "data.seq_len=64", "train.batch_size=4", "train.steps=3", "mesh.data=1"]
    overrides += [f"train.run_dir={run}", "peft.virtual_tokens=3", "train.eval_batches=1"]
    overrides += ["data.pack=false"] if method == "prefix" else []
    assert main(["train", str(config), *overrides, "--no-progress"]) == 0
    cfg, tokenizer, _, step = load_run(run)
    assert step == 3 and cfg.peft.method == method and cfg.finetune.init_from == str(pretrained)
    assert tokenizer.token_id("<|im_end|>") is not None  # the built-in template's tokens were added
    assert cfg.model.vocab_size >= tokenizer.vocab_size
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "exact match" in out and "of 24 held-out examples (who " in out
    assert main(["generate", str(run), "--prompt", "ROMEO.", "--max-new-tokens", "4", "--temperature", "0"]) == 0
