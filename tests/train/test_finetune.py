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


def test_a_set_key_counts_even_at_its_default_and_a_left_out_key_is_the_bases():
    """Fine-tuning inherits what the config leaves out; what it sets wins (runtime fields) or is refused with
    its name (shape), also when the value it sets is the default."""
    from jaxlm.config import ConfigError, ModelConfig, load_config
    from jaxlm.train.finetune import resolve

    base = ModelConfig(vocab_size=300, d_model=48, num_layers=2, num_heads=4, mlp_dim=96, dropout=0.1)
    tuned = resolve(load_config(None, ["finetune.init_from=base", "model.dropout=0.0"]), base)
    assert tuned.model.dropout == 0.0 and tuned.model.d_model == 48  # set wins, left out is inherited
    assert resolve(load_config(None, ["finetune.init_from=base"]), base).model.dropout == 0.1
    default_width = ModelConfig().d_model
    with pytest.raises(ConfigError, match=f"model.d_model={default_width} \\(the base has 48\\)"):
        resolve(load_config(None, ["finetune.init_from=base", f"model.d_model={default_width}"]), base)


def test_derived_model_fields_refuse_an_explicit_contrary_value():
    from jaxlm.config import ConfigError, load_config

    assert load_config(None, ["train.precision=bf16"]).model.dtype == "bfloat16"  # derived when left out
    with pytest.raises(ConfigError, match="model.dtype=float32 conflicts with train.precision=bf16"):
        load_config(None, ["train.precision=bf16", "model.dtype=float32"])
    ppo = ["train.objective=ppo", "align.reward=jaxlm.rewards:verse_line", "align.group=1", "finetune.init_from=b"]
    assert load_config(None, ppo).model.value_head  # PPO's critic, added when left out
    with pytest.raises(ConfigError, match="ppo trains a critic.*model.value_head=false"):
        load_config(None, [*ppo, "model.value_head=false"])
    cfg = load_config(None, ["model.dropout=0.0"])
    assert cfg.given >= {"model.dropout"} and "given" not in __import__("jaxlm.config").config.to_dict(cfg)


def test_a_rope_base_may_extend_its_context_but_learned_positions_may_not():
    """YaRN (or any RoPE scaling) and a longer max_seq_len keep a RoPE model's parameters: a fine-tune may set
    them. A learned position table's length is a shape: refused."""
    from jaxlm.config import ConfigError, ModelConfig, load_config
    from jaxlm.train.finetune import resolve

    yarn = ["model.rope_scaling=yarn", "model.rope_factor=16", "model.rope_original_max_len=256"]
    longer = ["finetune.init_from=base", "model.max_seq_len=4096", "data.seq_len=4096", *yarn]
    base = ModelConfig(vocab_size=300, d_model=48, num_layers=2, num_heads=4, mlp_dim=96, max_seq_len=256)
    tuned = resolve(load_config(None, longer), base).model
    assert (tuned.max_seq_len, tuned.rope_scaling, tuned.rope_factor) == (4096, "yarn", 16.0)
    learned = ModelConfig(vocab_size=300, d_model=48, num_layers=2, num_heads=4, mlp_dim=96, position="learned")
    with pytest.raises(ConfigError, match="model.max_seq_len=4096"):
        resolve(load_config(None, ["finetune.init_from=base", "model.max_seq_len=4096", "data.seq_len=4096"]), learned)
