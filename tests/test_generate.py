import dataclasses

import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.generate import Generator, generate_uncached
from jaxlm.nn.transformer import TransformerLM


def model_for(base, **kw):
    cfg = load_config(f"configs/{base}.yaml").model
    # Large init so that random models produce varied, tie-free greedy continuations.
    cfg = dataclasses.replace(
        cfg, vocab_size=128, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, init_std=0.3, **kw
    )
    return TransformerLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("base", ["llama_tiny", "gpt_tiny"])
def test_cached_greedy_equals_recompute_for_64_tokens_batched(base):
    model = model_for(base, max_seq_len=96)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 3, 30]]
    out = Generator(model).generate(prompts, max_new_tokens=64, temperature=0.0)
    for p, o in zip(prompts, out):
        ref = generate_uncached(model, p, max_new_tokens=64)
        assert o == ref
        assert len(set(ref)) > 8  # a real continuation, not one repeated token


@pytest.mark.parametrize("base", ["llama_tiny", "gpt_tiny"])
def test_full_context_slides_instead_of_failing(base):
    model = model_for(base, max_seq_len=24)
    prompt = list(range(1, 30))  # longer than the context
    out = Generator(model, window_shift=5).generate([prompt], max_new_tokens=50, temperature=0.0)[0]
    assert out == generate_uncached(model, prompt, max_new_tokens=50, window_shift=5)


def test_eos_stops_each_row():
    model = model_for("llama_tiny", max_seq_len=64)
    gen = Generator(model)
    free = gen.generate([[1, 2], [5]], max_new_tokens=40, temperature=0.0)
    eos = free[0][3]
    out = gen.generate([[1, 2], [5]], max_new_tokens=40, temperature=0.0, eos_id=eos)
    assert out[0] == free[0][:3]
    assert out[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])


def test_sampling_is_seeded():
    gen = Generator(model_for("gpt_tiny", max_seq_len=64))
    a = gen.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_k=20, seed=1)
    b = gen.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_k=20, seed=1)
    c = gen.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_k=20, seed=2)
    assert a == b and a != c


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="at least one token"):
        Generator(model_for("gpt_tiny", max_seq_len=32)).generate([[]], max_new_tokens=3)


def test_decode_compiles_once():
    gen = Generator(model_for("llama_tiny", max_seq_len=64))
    gen.generate([[1, 2, 3]], max_new_tokens=10, temperature=0.0)
    gen.generate([[4, 5, 6]], max_new_tokens=30, temperature=0.0)
    assert gen._decode._cache_size() == 1
    np.testing.assert_equal(gen._prefill._cache_size(), 1)
