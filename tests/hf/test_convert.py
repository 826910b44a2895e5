"""`jaxlm convert` both ways; a converted checkpoint works with generate, eval and continued training."""

import json

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.data.tokenizer import BPETokenizer
from jaxlm.train.run_dir import load_run
from tests.parity import require

torch = require("torch")
transformers = require("transformers")


@pytest.fixture
def hf_dir(tmp_path, corpus_file):
    text = corpus_file.read_text(encoding="utf-8")
    tokenizer = BPETokenizer.train([text], 300)
    config = transformers.Qwen2Config(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    path = tmp_path / "hf"
    model.save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return path


def test_convert_generate_eval_train_and_back(hf_dir, tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(run)]) == 0
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(run)]) == 2  # never overwrites a run
    assert "already holds a run" in capsys.readouterr().err

    assert main(["generate", str(run), "--prompt", "Shall I", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert "val loss" in capsys.readouterr().out

    # Continued training on other data from the imported weights.
    overrides = [f"data.source={corpus_file}", "data.seq_len=32", "train.batch_size=4", "train.steps=2"]
    overrides += ["train.eval_batches=1", "mesh.data=1"]
    assert main(["train", str(run / "config.yaml"), *overrides, "--no-progress"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]

    back = tmp_path / "back"
    assert main(["convert", "--to-hf", str(run), "--out", str(back)]) == 0
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(back).eval()
    _, _, model, step = load_run(run)
    assert step == 2
    tokens = np.arange(20)[None] % 300
    with torch.no_grad():
        want = reloaded(torch.tensor(tokens)).logits.numpy()
    got, _ = model(tokens)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    assert (back / "tokenizer.json").is_file()


def _finetune(hf_dir, corpus_file, run, *extra):
    overrides = [f"finetune.init_from={hf_dir}", f"data.source={corpus_file}", "data.seq_len=32"]
    overrides += ["train.batch_size=4", "train.steps=2", "train.eval_batches=1", "train.lr=3e-2", "mesh.data=1"]
    overrides += [f"train.run_dir={run}", "train.warmup_steps=0", *extra]
    config = run.parent / "finetune.yaml"
    config.write_text("finetune:\n  init_from: ''\n")
    assert main(["train", str(config), *overrides, "--no-progress"]) == 0


def _logits(model, tokens):
    return np.asarray(model(tokens)[0])


def test_peft_runs_convert_to_adapters_and_back(hf_dir, tmp_path, corpus_file, capsys):
    """A LoRA run -> peft adapter (peft loads it), -> merged weights (transformers loads them), and the adapter
    -> a run again (same model); prompt tuning has nothing to merge."""
    peft = require("peft")
    tokens = np.arange(20)[None] % 300
    base = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        base_logits = base(torch.tensor(tokens)).logits.numpy()

    run = tmp_path / "lora"
    _finetune(hf_dir, corpus_file, run, "peft.method=lora", "peft.rank=4", "peft.targets=[q,v,down]")
    _, _, model, _ = load_run(run)
    ours = _logits(model, tokens)
    assert np.abs(ours - base_logits).max() > 1e-3  # two steps moved the adapter

    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "adapter")]) == 0
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(hf_dir.resolve()) and conf["r"] == 4
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)

    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)

    back = tmp_path / "back"
    assert main(["convert", "--from-hf", str(tmp_path / "adapter"), "--out", str(back)]) == 0
    cfg, _, again, step = load_run(back)
    assert (cfg.peft.method, cfg.peft.rank, cfg.peft.targets, step) == ("lora", 4, ("q", "v", "down"), 0)
    np.testing.assert_allclose(_logits(again, tokens), ours, atol=1e-5)
    assert main(["generate", str(back), "--prompt", "Shall I", "--max-new-tokens", "4", "--temperature", "0"]) == 0

    prompt = tmp_path / "prompt"
    _finetune(hf_dir, corpus_file, prompt, "peft.method=prompt", "peft.virtual_tokens=3")
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(prompt), "--out", str(tmp_path / "pm"), "--merge"]) == 2
    assert "no weights to merge" in capsys.readouterr().err
    assert not (tmp_path / "pm").exists()
    assert main(["convert", "--to-hf", str(prompt), "--out", str(tmp_path / "pa")]) == 0
    base = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()  # peft wrapped the first one in place
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "pa").eval()
    _, _, model, _ = load_run(prompt)
    with torch.no_grad():
        want = pm(torch.tensor(tokens)).logits.numpy()[:, 3:]
    np.testing.assert_allclose(want, _logits(model, tokens), atol=1e-4)


def test_qlora_run_merges_its_dequantized_base(hf_dir, tmp_path, corpus_file):
    run = tmp_path / "qlora"
    _finetune(hf_dir, corpus_file, run, "peft.method=qlora", "peft.rank=2")
    _, _, model, _ = load_run(run)
    tokens = np.arange(12)[None]
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(tokens)).logits.numpy(), _logits(model, tokens), atol=1e-4)


def test_adapter_without_a_local_base_asks_for_one(hf_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    conf = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "base_model_name_or_path": "Qwen/Qwen2-0.5B"}
    (adapter / "adapter_config.json").write_text(json.dumps(conf))
    assert main(["convert", "--from-hf", str(adapter), "--out", str(tmp_path / "run")]) == 2
    assert "pass --base" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
