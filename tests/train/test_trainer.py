import os
import signal
import subprocess
import sys
import time

import pytest

from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.train import read_metrics, train


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def test_stop_and_resume_equals_uninterrupted(tiny_config, tmp_path):
    full = tiny_config("llama_tiny", "train.steps=8", run_dir=tmp_path / "full")
    train(full, progress=False)
    split = tiny_config("llama_tiny", "train.steps=8", run_dir=tmp_path / "split")
    first = train(split, stop_after=4, progress=False)
    assert first["step"] == 4
    second = train(split, progress=False)
    assert second["step"] == 8
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit-for-bit, step by step
    assert second["val_bpb"] == pytest.approx(train(full, progress=False)["val_bpb"])


def test_run_directory_and_resume_guard(tiny_config, tmp_path):
    cfg = tiny_config("gpt_tiny", run_dir=tmp_path / "run")
    out = train(cfg, progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= names
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert out["val_bpb"] > 0 and out["val_tokens"] > 0
    changed = tiny_config("gpt_tiny", "model.num_layers=3", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="model.num_layers: 2 -> 3"):
        train(changed, progress=False)


@pytest.mark.slow
def test_loss_falls_on_embedded_corpus(tiny_config, tmp_path):
    cfg = tiny_config(
        "llama_tiny", "data.source=shakespeare", "train.steps=60", "train.eval_batches=4", run_dir=tmp_path / "r"
    )
    out = train(cfg, progress=False)
    seen = losses(tmp_path / "r")
    assert sum(seen[s] for s in range(51, 61)) / 10 < seen[1] - 1.5
    assert out["val_bpb"] < 5.0  # an untrained model scores log2(300) = 8.2


def test_cli_train_eval_generate(tiny_config, tmp_path, capsys):
    run = tmp_path / "cli"
    cfg = tiny_config("llama_tiny", run_dir=run)
    overrides = [f"data.source={cfg.data.source}", f"train.run_dir={run}", "data.tokenizer=bpe"]
    from tests.conftest import TINY

    assert main(["train", "configs/llama_tiny.yaml", *TINY, *overrides, "--no-progress"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", str(run)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "Shall I", "--prompt", "你好", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "Shall I" in out and "你好" in out and "sample 2" in out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "jaxlm generate: " in (err := capsys.readouterr().err) and "neither config.yaml nor config.json" in err
    run = tmp_path / "run"
    assert main(["train", "configs/llama_tiny.yaml", "data.source=/no/such/file.txt", f"train.run_dir={run}"]) == 2
    assert "/no/such/file.txt" in capsys.readouterr().err
    assert main(["train", "configs/llama_tiny.yaml", "mesh.data=64", f"train.run_dir={run}"]) == 2
    assert "64" in capsys.readouterr().err
    assert not run.exists()  # nothing written before the inputs were checked


@pytest.mark.parametrize("cmd", ["train", "generate", "eval"])
def test_cli_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: jaxlm " + cmd in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes(tiny_config, tmp_path):
    from tests.conftest import TINY

    run = tmp_path / "sig"
    cfg = tiny_config("llama_tiny", run_dir=run)
    args = [
        *TINY,
        f"data.source={cfg.data.source}",
        f"train.run_dir={run}",
        "data.tokenizer=byte",
        "train.steps=100000",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlm", "train", "configs/llama_tiny.yaml", *args, "--no-progress"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err
    step = max(losses(run))
    assert (run / "checkpoints" / str(step)).is_dir()
    resumed = train(load_config(run / "config.yaml", ["train.steps=" + str(step + 2)]), progress=False)
    assert resumed["step"] == step + 2


def test_bert_mlm_loss_falls_on_embedded_corpus(tiny_config, tmp_path):
    """BERT wiring (bidirectional, post-norm, token types, MLM head) trained with masked tokens."""
    cfg = tiny_config(
        "bert_tiny", "data.source=shakespeare", "train.steps=60", "train.eval_batches=4", run_dir=tmp_path / "b"
    )
    assert cfg.train.objective == "mlm" and not cfg.model.causal
    out = train(cfg, progress=False)
    seen = losses(tmp_path / "b")
    # Byte tokens: an untrained model scores ln(300) = 5.7 nats on the masked positions.
    assert sum(seen[s] for s in range(51, 61)) / 10 < seen[1] - 1.5
    assert out["val_loss"] < 4.0


@pytest.mark.parametrize("base", ["t5_tiny", "transformer_tiny"])
def test_span_corruption_loss_falls_and_the_model_generates(base, tiny_config, tmp_path, capsys):
    run = tmp_path / base
    cfg = tiny_config(base, "data.source=shakespeare", "train.steps=40", "train.eval_batches=2", run_dir=run)
    assert cfg.train.objective == "span" and cfg.model.decoder_layers
    out = train(cfg, progress=False)
    seen = losses(run)
    assert sum(seen[s] for s in range(31, 41)) / 10 < seen[1] - 1.5
    assert out["val_loss"] < 3.5
    assert main(["generate", str(run), "--prompt", "To be, or not", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert "val loss" in capsys.readouterr().out


def test_seq2seq_pairs_train(tiny_config, tmp_path, corpus_file):
    """Source/target text pairs (here: reverse each line's words), in any language."""
    lines = [ln for ln in corpus_file.read_text(encoding="utf-8").splitlines() if ln.strip()][:400]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{ln}\t{' '.join(ln.split()[::-1])}\n" for ln in lines), encoding="utf-8")
    run = tmp_path / "pairs_run"
    cfg = tiny_config(
        "transformer_tiny", f"data.source={pairs}", "train.objective=seq2seq", "train.steps=30", run_dir=run
    )
    out = train(cfg, progress=False)
    seen = losses(run)
    assert sum(seen[s] for s in range(21, 31)) / 10 < seen[1] - 1.0
    assert out["val_tokens"] > 0


@pytest.mark.parametrize(
    "argv, option",
    [
        (["generate", "RUN", "--prompt", "a", "--top-p", "2"], "--top-p"),
        (["generate", "RUN", "--prompt", "a", "--top-p", "0"], "--top-p"),
        (["generate", "RUN", "--prompt", "a", "--temperature", "-1"], "--temperature"),
        (["generate", "RUN", "--prompt", "a", "--temperature", "nan"], "--temperature"),
        (["generate", "RUN", "--prompt", "a", "--top-k", "-3"], "--top-k"),
        (["generate", "RUN", "--prompt", "a", "--top-k", "2.5"], "--top-k"),
        (["generate", "RUN", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "RUN", "--prompt", "a", "--seed", "-1"], "--seed"),
        (["generate", "RUN"], "--prompt"),
        (["eval", "RUN", "--batches", "-1"], "--batches"),
        (["eval", "RUN", "--batches", "x"], "--batches"),
        (["train", "CONFIG", "--stop-after", "0"], "--stop-after"),
        (["train", "CONFIG", "--heartbeat-timeout", "0"], "--heartbeat-timeout"),
        (["train", "CONFIG", "--num-processes", "0"], "--num-processes"),
        (["train", "CONFIG", "--process-id", "-1"], "--process-id"),
        (["train", "CONFIG", "--coordinator", "localhost"], "--coordinator"),
        (["train", "CONFIG", "--bogus"], "--bogus"),
        (["plan", "CONFIG", "--devices", "0"], "--devices"),
        (["convert", "--from-hf", "a"], "--out"),
        (["convert", "--from-hf", "a", "--to-hf", "b", "--out", "c"], "--to-hf"),
        (["fly"], "fly"),
    ],
)
def test_cli_bad_options_give_one_error_line(argv, option, capsys):
    """Every verb's invalid option: one `error:` line naming it, exit 2, before anything is loaded or compiled."""
    argv = [{"CONFIG": "configs/llama_tiny.yaml", "RUN": "runs/never-read"}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0], err


def test_generator_rejects_bad_sampling_before_tracing():
    from flax import nnx

    from jaxlm.generate import Generator
    from jaxlm.nn.transformer import TransformerLM
    from tests.conftest import TINY

    model = TransformerLM(load_config("configs/llama_tiny.yaml", TINY).model, rngs=nnx.Rngs(0))
    gen = Generator(model)
    for bad, name in [({"top_p": 2.0}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k")]:
        with pytest.raises(ValueError, match=name):
            gen.generate([[1, 2]], max_new_tokens=2, **bad)
