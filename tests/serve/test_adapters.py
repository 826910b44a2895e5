"""`jaxlm serve BASE --adapter NAME=DIR`: a peft LoRA directory and a jaxlm LoRA run served on one base, in
one continuous batch; each request's `model` picks its adapter and gets what that adapter alone gives."""

import concurrent.futures
import dataclasses

import httpx
import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.cli import main
from jaxlm.config import PeftConfig, load_config
from jaxlm.data.tokenizer import BPETokenizer
from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.io import to_hf
from jaxlm.hf.peft import load_adapter, save_adapter
from jaxlm.nn.transformer import TransformerLM
from jaxlm.peft import apply_peft, loras
from jaxlm.serve.adapters import attach_adapters
from jaxlm.serve.model import load_served
from jaxlm.serve.server import build_service, running

ARCH = "LlamaForCausalLM"
PROMPTS = ["Shall I compare thee", "When forty winters", "Look in thy glass"]


def base_model():
    cfg = load_config("configs/llama_tiny.yaml").model
    cfg = dataclasses.replace(
        cfg, vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=64,
        init_std=0.3, tie_embeddings=False,
    )  # fmt: skip
    return TransformerLM(cfg, rngs=nnx.Rngs(0))


def lora_dir(path, base_dir, pc: PeftConfig, seed: int):
    """A peft LoRA directory of `pc` with random A and B."""
    model = base_model()
    apply_peft(model, pc, seed=seed)
    for i, (*_, lora) in enumerate(loras(model)):
        lora.b.set_value(0.5 * jax.random.normal(jax.random.PRNGKey(100 * seed + i), lora.b.shape))
    save_adapter(model, path, pc, arch=ARCH, base=str(base_dir))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, corpus_file):
    """(base HF dir, peft LoRA dir, jaxlm LoRA run dir, prompt-tuning dir) on disk."""
    tmp = tmp_path_factory.mktemp("adapters")
    tokenizer = BPETokenizer.train([corpus_file.read_text(encoding="utf-8")], 300)
    to_hf(base_model(), tmp / "base", tokenizer=tokenizer)
    peft_a = lora_dir(tmp / "a", tmp / "base", PeftConfig(method="lora", rank=4, targets=("q", "v", "up")), 1)
    peft_b = lora_dir(tmp / "b", tmp / "base", PeftConfig(method="lora", rank=8, targets=("q", "o", "lm_head")), 2)
    assert main(["convert", "--from-hf", str(peft_b), "--base", str(tmp / "base"), "--out", str(tmp / "b-run")]) == 0
    prompt = base_model()
    apply_peft(prompt, PeftConfig(method="prompt", virtual_tokens=4), seed=3)
    save_adapter(prompt, tmp / "p", PeftConfig(method="prompt", virtual_tokens=4), arch=ARCH)
    return tmp / "base", peft_a, tmp / "b-run", tmp / "p"


@pytest.fixture(scope="module")
def server(dirs):
    base, a, b_run, _ = dirs
    served = load_served(base, "base")
    attach_adapters(served, [f"poet={a}", f"critic={b_run}"])
    service = build_service(served, slots=4, chunk=8, queue_timeout=20.0, warm_up_tokens=32)
    with running(service) as url:
        yield url, service


def alone(base, adapter, prompts: list[str]) -> list[tuple]:
    """(text, token log-probabilities) of greedy decoding over the base with only `adapter` (or none)."""
    served = load_served(base, "base")
    if adapter is not None:
        load_adapter(served.model, adapter, arch=ARCH)
    engine = Engine(DecodeSteps(served.model), slots=1, chunk=8)
    out = []
    for prompt in prompts:
        r = engine.submit(
            Request(served.tokenizer.encode(prompt), 10, temperature=0.0, stop_ids=served.stop_ids, logprobs=0)
        )
        engine.run()
        out.append((served.tokenizer.decode(r.tokens), r.token_logprobs))
    return out


def test_each_model_equals_its_adapter_served_alone(server, dirs):
    url, _ = server
    base, a, _, _ = dirs
    b = dirs[0].parent / "b"  # the run was converted from this peft directory
    cases = [(m, p) for m in ("base", "poet", "critic") for p in PROMPTS]

    def ask(case):
        model, prompt = case
        body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0}
        got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert got["model"] == model
        return got["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:  # one continuous batch of all three
        answers = list(pool.map(ask, cases))
    texts = {}
    want = {m: alone(base, d, PROMPTS) for m, d in {"base": None, "poet": a, "critic": b}.items()}
    for (model, prompt), choice in zip(cases, answers):
        text, lps = want[model][PROMPTS.index(prompt)]
        assert choice["text"] == text
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], lps, atol=1e-4)
        texts.setdefault(prompt, set()).add(text)
    assert any(len(t) > 1 for t in texts.values())  # the adapters change what is written


def test_models_are_listed_and_an_unknown_one_is_404(server):
    url, _ = server
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["base", "poet", "critic"]
    assert "parent" not in cards[0] and all(c["parent"] == "base" for c in cards[1:])
    assert httpx.get(url + "/v1/models/poet").json()["id"] == "poet"
    body = {"model": "sonneteer", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'poet'" in r.json()["error"]["message"]
    chat = httpx.post(url + "/v1/chat/completions", json={**body, "model": "critic", "max_tokens": 3}, timeout=60)
    assert chat.status_code == 200 and chat.json()["model"] == "critic"


def test_bad_adapters_are_named(dirs, tmp_path):
    base, a, b_run, prompt = dirs
    cases = [
        (["poet"], ConfigError, "expected NAME=DIR"),
        (["a b=" + str(a)], ConfigError, "letters, digits"),
        ([f"base={a}"], ConfigError, "already served"),
        ([f"x={a}", f"x={a}"], ConfigError, "already served"),
        ([f"x={tmp_path / 'missing'}"], DataError, "does not exist"),
        ([f"x={tmp_path}"], DataError, "neither adapter_config.json"),
        ([f"x={prompt}"], ConfigError, "PROMPT_TUNING adapter; multi-adapter serving takes LoRA"),
    ]
    for specs, error, message in cases:
        served = load_served(base, "base")
        with pytest.raises(error, match=message):
            attach_adapters(served, specs)
        assert not loras(served.model) and served.adapters == ()  # the base is left as it was
    other = load_served(base, "base")  # a run over another base: its frozen weights differ
    other.model.stack.final_norm.scale.set_value(other.model.stack.final_norm.scale[...] + 1)
    with pytest.raises(ConfigError, match="trained on another base than base: its stack.final_norm"):
        attach_adapters(other, [f"x={b_run}"])
    with_adapter = load_served(b_run, "tuned")
    with pytest.raises(ConfigError, match="carries adapters itself"):
        attach_adapters(with_adapter, [f"x={a}"])
