"""`jaxlm serve` keeps the weights once: the engine's per-layer buffers, not the model's stacked copy too."""

import gc

import httpx
import jax
from flax import nnx

from jaxlm.generate import Generator
from jaxlm.serve.server import build_service, running

from .conftest import tiny_served


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_a_released_model_serves_the_same_answer_with_its_weights_once():
    served = tiny_served()
    prompt = served.tokenizer.encode("To be")
    want = Generator(served.model).generate([prompt], max_new_tokens=6, temperature=0.0)[0]
    layers = sum(x.nbytes for x in jax.tree.leaves(nnx.state(served.model.stack.layers)))
    before = _live_bytes()
    service = build_service(served, slots=2, chunk=16, warm_up_tokens=16, release_model=True)
    assert served.model is None and served.cfg.vocab_size == 257 and served.context == 128
    # The engine's buffers of the layers replaced the stacked ones (and its KV pool came with it).
    kv = service.worker.engine.kv["kv_bytes"]
    assert _live_bytes() - before < kv + layers // 4
    with running(service) as url:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        out = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert out["choices"][0]["text"] == served.tokenizer.decode(want)
