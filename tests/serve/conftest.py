import dataclasses

import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.data.chat import CHATML
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.nn.transformer import TransformerLM
from jaxlm.serve.model import Served
from jaxlm.serve.server import build_service, running


def tiny_served(max_seq_len: int = 128) -> Served:
    """A random byte-level llama: tiny, and varied enough that greedy outputs differ between prompts."""
    cfg = load_config("configs/llama_tiny.yaml").model
    cfg = dataclasses.replace(
        cfg, vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_seq_len=max_seq_len, init_std=0.3,
    )  # fmt: skip
    return Served("tiny", TransformerLM(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), CHATML)


@pytest.fixture(scope="module")
def server():
    """(base URL, service) of a 4-slot server on 127.0.0.1, stopped after the module."""
    service = build_service(tiny_served(), slots=4, chunk=16, queue_timeout=20.0)
    with running(service) as url:
        yield url, service
