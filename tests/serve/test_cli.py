"""`jaxlm serve` as users run it: a trained run (and a LoRA run, and a Hugging Face directory) in a real
process, SIGTERM for a clean exit, and clear errors before anything compiles."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jaxlm.cli import main
from jaxlm.generate import Generator
from jaxlm.serve.model import load_served
from jaxlm.serve.server import build_service, free_port, running
from jaxlm.train.run_dir import load_run


def _start(run, port, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxlm", "serve", str(run), "--port", str(port), "--slots", "2", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


@pytest.mark.slow
def test_serve_a_run_then_sigterm_exits_cleanly(pretrained):
    port = free_port()
    proc = _start(pretrained, port, "--grace", "30")
    try:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["run"]
        got = client.completions.create(model="run", prompt="ROMEO.", max_tokens=12, temperature=0)
        _, tokenizer, model, _ = load_run(pretrained)
        ids = Generator(model).generate([tokenizer.encode("ROMEO.")], max_new_tokens=12, temperature=0.0)[0]
        assert got.choices[0].text == tokenizer.decode(
            ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
        )

        lines, streaming = [], threading.Event()

        def stream():  # in flight when SIGTERM comes: it finishes (within the grace time) or ends cleanly
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": "run", "prompt": "JULIET.", "max_tokens": 40, "stream": True, "temperature": 1.0,
            }) as r:  # fmt: skip
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        streaming.set()
            streaming.set()

        t = threading.Thread(target=stream)
        t.start()
        assert streaming.wait(60)  # the request is in flight (SIGTERM before it connected would refuse it)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(timeout=60) == 0
        assert lines and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] in ("length", "stop", "cancelled")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serve_errors_come_before_compiling(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "neither config.yaml nor config.json" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", str(tmp_path / "empty"), "--port", str(s.getsockname()[1])]) == 2
        assert "cannot serve on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--adapter", "poet"]) == 2  # named before the model loads
    assert "--adapter 'poet': expected NAME=DIR" in capsys.readouterr().err


def test_a_lora_run_is_served_with_its_adapter(pretrained, tmp_path):
    from flax import nnx

    from jaxlm.nn.adapters import Adapter

    run = tmp_path / "lora"
    config = tmp_path / "ft.yaml"
    config.write_text(f"finetune:\n  init_from: {pretrained}\npeft:\n  method: lora\n")
    overrides = ["train.objective=sft", "data.source=shakespeare_instructions", "data.seq_len=64"]
    overrides += ["train.batch_size=4", "train.steps=2", "mesh.data=1", f"train.run_dir={run}", "train.eval_batches=1"]
    assert main(["train", str(config), *overrides, "--no-progress"]) == 0
    served = load_served(run)
    assert nnx.state(served.model, Adapter)  # the adapters, not the base alone
    messages = [{"role": "user", "content": "Who?"}]
    prompt = served.chat_prompt(messages)
    assert prompt[-3:] == served.tokenizer.encode("<|im_start|>assistant\n")[-3:]
    want = Generator(served.model).generate([prompt], max_new_tokens=8, temperature=0.0)[0]
    stops = [i for i, t in enumerate(want) if t in served.stop_ids]
    want = served.tokenizer.decode(want[: stops[0]] if stops else want)
    with running(build_service(served, slots=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        got = client.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_quantized_weights_are_served(pretrained, weights):
    """`jaxlm serve --weights int8|nf4`: the server answers as `Generator` over the same quantized model, and
    /health reports the bytes of the weights it reads (NF4 pads a tiny model's weights to 16,384 values)."""
    import jax
    from flax import nnx

    from jaxlm.nn.quantized import QuantizedWeight
    from jaxlm.quantize import store_weights

    served = load_served(pretrained)
    store_weights(served.model, weights)
    assert isinstance(served.model.stack.layers.mlp.w_out, QuantizedWeight)
    prompt = served.tokenizer.encode("ROMEO.")
    want = Generator(served.model).generate([prompt], max_new_tokens=8, temperature=0.0)[0]
    stops = [i for i, t in enumerate(want) if t in served.stop_ids]
    want = served.tokenizer.decode(want[: stops[0]] if stops else want)
    with running(build_service(served, slots=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        got = client.completions.create(model="run", prompt="ROMEO.", max_tokens=8, temperature=0)
        health = httpx.get(url + "/health", timeout=10).json()
    assert got.choices[0].text == want
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(load_served(pretrained).model)))
    assert 0 < health["weight_bytes"] and (weights == "nf4" or health["weight_bytes"] < float_bytes)
