import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import load_config
from jaxlm.generate import Generator, generate_uncached
from jaxlm.nn.seq2seq import EncoderDecoderLM
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


def test_prefix_lm_generation_attends_the_prompt_both_ways():
    """Batched, left-padded, cached prefix-LM generation equals recomputing with the prefix mask each step."""
    model = model_for("llama_tiny", max_seq_len=64)
    prompts = [[5, 9, 2, 7, 1], [3, 4]]
    out = Generator(model, prefix_lm=True).generate(prompts, max_new_tokens=8, temperature=0.0)
    # The reference recomputes the whole sequence each step, right-padded to the context (one compile: the
    # padding comes after every position read, and is no part of the prefix).
    forward = nnx.jit(lambda m, tokens, prefix: m(tokens, prefix=prefix)[0])
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(8):
            tokens = np.zeros((1, 64), np.int32)
            tokens[0, : len(seq)] = seq
            logits = forward(model, jnp.asarray(tokens), jnp.arange(64)[None] < len(p))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert o == seq[len(p) :]
    assert out[0] != Generator(model).generate(prompts[:1], max_new_tokens=8, temperature=0.0)[0]


@pytest.mark.parametrize("base", ["llama_tiny", "gpt_tiny"])
def test_full_context_slides_instead_of_failing(base):
    model = model_for(base, max_seq_len=24)
    prompt = list(range(1, 30))  # longer than the context
    out = Generator(model, window_shift=5).generate([prompt], max_new_tokens=50, temperature=0.0)[0]
    assert out == generate_uncached(model, prompt, max_new_tokens=50, window_shift=5)


def test_stop_tokens_stop_each_row():
    """Any of the stop tokens ends a row (left out, or kept with with_stop), each row at its own."""
    model = model_for("llama_tiny", max_seq_len=64)
    gen = Generator(model)
    free = gen.generate([[1, 2], [5]], max_new_tokens=40, temperature=0.0)
    first, second = free[0][3], free[1][5]
    stops = {first, second}
    out = gen.generate([[1, 2], [5]], max_new_tokens=40, temperature=0.0, stop_ids=stops)
    cut = [next(k for k, t in enumerate(row) if t in stops) for row in free]
    assert out == [free[0][: cut[0]], free[1][: cut[1]]] and cut[0] <= 3 and cut[1] <= 5
    kept = gen.generate([[1, 2], [5]], max_new_tokens=40, temperature=0.0, stop_ids=stops, with_stop=True)
    assert kept == [free[0][: cut[0] + 1], free[1][: cut[1] + 1]]


def test_stop_ids_are_end_of_text_and_chatml_turns():
    from jaxlm.data.chat import CHATML_TOKENS, stop_ids
    from jaxlm.data.tokenizer import ByteTokenizer, build_tokenizer

    assert stop_ids(ByteTokenizer()) == {ByteTokenizer().eos_id}
    bpe = build_tokenizer("bpe", ["To be, or not to be"] * 20, 300)
    bpe.add_special_tokens(list(CHATML_TOKENS))
    assert stop_ids(bpe) == {bpe.eos_id, *(bpe.token_id(t) for t in CHATML_TOKENS)}


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
    assert gen.steps.decode._cache_size() == 1
    assert gen.steps.prefill._cache_size() == 1


def seq2seq_model(**kw):
    cfg = load_config("configs/t5_tiny.yaml").model
    cfg = dataclasses.replace(
        cfg, vocab_size=128, d_model=32, num_layers=2, decoder_layers=2, num_heads=4, head_dim=8, mlp_dim=64, **kw
    )
    return EncoderDecoderLM(dataclasses.replace(cfg, init_std=0.3), rngs=nnx.Rngs(0))


def test_encoder_decoder_cached_equals_recompute():
    """The one generator on an encoder-decoder: cross K/V computed once, self-attention cached; equals the
    teacher-forced forward recomputed for every token (no torch needed)."""
    model = seq2seq_model(max_seq_len=64)
    sources = [[5, 6, 7, 8, 9, 10], [11, 12]]
    out = Generator(model).generate([[0], [0]], sources=sources, max_new_tokens=20, temperature=0.0)
    graphdef, params = nnx.split(model)
    # One compiled forward: the target is right-padded to 21 (causal, so padding never reaches earlier tokens).
    forward = jax.jit(lambda p, src, tgt, ok: nnx.merge(graphdef, p)(src, tgt, tgt_valid=ok))
    for src, got in zip(sources, out):
        tgt = [0]
        for _ in range(20):
            padded = np.zeros((1, 21), np.int32)
            padded[0, : len(tgt)] = tgt
            logits = forward(params, jnp.asarray([src]), padded, np.arange(21)[None] < len(tgt))
            tgt.append(int(jnp.argmax(logits[0, len(tgt) - 1])))
        assert got == tgt[1:]
        assert len(set(got)) > 3  # a real continuation, not one repeated token


def test_encoder_decoder_guards_and_refill():
    model = seq2seq_model(max_seq_len=16)
    gen = Generator(model)
    assert gen.generate([[0]], sources=[[4, 5]], max_new_tokens=0) == [[]]
    with pytest.raises(ValueError, match="one non-empty source per prompt"):
        gen.generate([[0]], max_new_tokens=4)
    out = gen.generate([[0]], sources=[[4, 5, 6]], max_new_tokens=40, temperature=0.0)  # past the 16-slot cache
    assert len(out[0]) == 40
    with pytest.raises(ValueError, match="for encoder-decoder models"):
        Generator(model_for("llama_tiny")).generate([[1]], sources=[[1]], max_new_tokens=2)


def test_prompts_sharing_a_prefix_prefill_in_one_step(monkeypatch):
    """A batch of prompts that share their first blocks (a chat template's system prompt) prefills in one step
    of all rows, at a chunk of at most a third padding (48 for 40 tokens), and each row still generates what
    it generates alone."""
    from jaxlm.engine import batcher

    model = model_for("llama_tiny", max_seq_len=128)
    shared = [int(t) for t in np.random.default_rng(0).integers(1, 128, 36)]  # two full blocks and more
    prompts = [shared + [i + 1, i + 2, i + 3, i + 4] for i in range(4)]
    steps = []
    rows = batcher.Engine._prefill_rows
    monkeypatch.setattr(
        batcher.Engine, "_prefill_rows", lambda e, r, T, t: steps.append((len(r), T)) or rows(e, r, T, t)
    )
    out = Generator(model).generate(prompts, max_new_tokens=4, temperature=0.0)
    assert steps == [(4, 48)]
    for p, o in zip(prompts, out):
        assert o == generate_uncached(model, p, max_new_tokens=4)
