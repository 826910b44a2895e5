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
