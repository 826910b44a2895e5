"""`jaxlm serve HF_DIR`: a Hugging Face model directory (weights + tokenizer.json) is served as it loads."""

import openai

from jaxlm.generate import Generator
from jaxlm.serve.model import load_served
from jaxlm.serve.server import build_service, running
from tests.hf.test_convert import hf_dir  # noqa: F401  (a Qwen2 directory from transformers)


def test_a_hugging_face_directory_is_served(hf_dir):  # noqa: F811
    served = load_served(hf_dir, name="qwen-tiny")
    ids = served.tokenizer.encode("ROMEO.")
    out = Generator(served.model).generate([ids], max_new_tokens=10, temperature=0.0)[0]
    cut = next((i for i, t in enumerate(out) if t in served.stop_ids), len(out))
    with running(build_service(served, slots=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        got = client.completions.create(model="qwen-tiny", prompt="ROMEO.", max_tokens=10, temperature=0)
        chat = client.chat.completions.create(
            model="qwen-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
    assert got.choices[0].text == served.tokenizer.decode(out[:cut])
    assert chat.choices[0].finish_reason in ("length", "stop")
