"""lm-evaluation-harness against `jaxlm serve`: its `local-completions` model (loglikelihood: echo +
logprobs; generate_until) and `local-chat-completions` (generate_until through the chat template) give the
same scores, per-example log-likelihoods and generations as its own `hf` backend on the same Hugging Face
model. The task is tests/serve/lm_eval/ (JSON lines and task YAMLs, loaded with include_path)."""

from pathlib import Path

import pytest

from jaxlm.data.chat import CHATML
from jaxlm.data.corpus import embedded_works
from jaxlm.data.tokenizer import BPETokenizer
from jaxlm.serve.model import load_served
from jaxlm.serve.server import build_service, running
from tests.parity import require

pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "lm_eval"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random Llama with a BPE tokenizer and a chat template, as transformers saves them."""
    torch, transformers = require("torch"), require("transformers")
    path = tmp_path_factory.mktemp("lm_eval") / "hf"
    tokenizer = BPETokenizer.train([embedded_works()["hamlet.txt"][:100_000]], 400)
    config = transformers.LlamaConfig(
        vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.eos_id, initializer_range=0.3,  # peaked logits: no near-ties in greedy decoding
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The task YAMLs with the data file's absolute path."""
    TaskManager = require("lm_eval.tasks").TaskManager
    out = tmp_path_factory.mktemp("tasks")
    for f in TASKS.glob("*.yaml"):
        text = f.read_text().replace("test: questions.jsonl", f"test: {TASKS / 'questions.jsonl'}")
        (out / f.name).write_text(text)
    return TaskManager(include_path=str(out))


def evaluate(model, model_args, tasks, task_manager, **kw):
    lm_eval = require("lm_eval")
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=task_manager, log_samples=True, **kw
    )
    return out["results"], {t: [s["resps"] for s in out["samples"][t]] for t in tasks}


def test_lm_eval_through_the_server_equals_its_hf_backend(hf_model, task_manager):
    served = load_served(hf_model, name="tiny")
    tasks = ["jaxlm_mc", "jaxlm_gen"]
    with running(build_service(served, slots=4, warm_up_tokens=64)) as url:
        common = {"model": "tiny", "max_retries": 1}
        ours, our_samples = evaluate(
            "local-completions",
            {**common, "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
             "tokenizer": str(hf_model), "num_concurrent": 4},
            tasks, task_manager,
        )  # fmt: skip
        # Without a tokenizer: lm-eval finds /tokenize and /tokenizer_info (its remote tokenizer backend).
        remote, remote_samples = evaluate(
            "local-completions", {**common, "base_url": url + "/v1/completions"}, ["jaxlm_mc"], task_manager
        )
        chat, chat_samples = evaluate(
            "local-chat-completions",
            {**common, "base_url": url + "/v1/chat/completions"},
            ["jaxlm_gen"], task_manager, apply_chat_template=True,
        )  # fmt: skip
    hf_args = {"pretrained": str(hf_model), "dtype": "float32", "device": "cpu"}
    ref, ref_samples = evaluate("hf", hf_args, tasks, task_manager)
    ref_chat, ref_chat_samples = evaluate("hf", hf_args, ["jaxlm_gen"], task_manager, apply_chat_template=True)

    for metric in ("acc,none", "acc_norm,none"):
        assert ours["jaxlm_mc"][metric] == ref["jaxlm_mc"][metric] == remote["jaxlm_mc"][metric]
    for got in (our_samples["jaxlm_mc"], remote_samples["jaxlm_mc"]):
        for example, expected in zip(got, ref_samples["jaxlm_mc"], strict=True):
            for [(ll, greedy)], [(ref_ll, ref_greedy)] in zip(example, expected, strict=True):  # one per choice
                assert abs(ll - ref_ll) <= 1e-4 * max(1.0, abs(ref_ll)) and greedy == ref_greedy
    assert our_samples["jaxlm_gen"] == ref_samples["jaxlm_gen"]
    assert ours["jaxlm_gen"]["exact_match,none"] == ref["jaxlm_gen"]["exact_match,none"]
    assert chat_samples["jaxlm_gen"] == ref_chat_samples["jaxlm_gen"]
    assert any(s != [[""]] for s in chat_samples["jaxlm_gen"])
