import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxlm.config import load_config
from jaxlm.nn.seq2seq import EncoderDecoderLM


def t5(**kw):
    cfg = load_config("configs/t5_tiny.yaml").model
    return dataclasses.replace(
        cfg, vocab_size=97, d_model=32, num_layers=2, decoder_layers=2, num_heads=4, head_dim=8, mlp_dim=48, **kw
    )


def test_t5_dropout_sites_and_no_keys_no_dropout():
    """With keys, T5 drops each stack's final-norm output (a fraction `rate` of exact zeros in the
    encoder states); without keys the model with dropout computes exactly the model without."""
    rate = 0.3
    plain = EncoderDecoderLM(t5(), rngs=nnx.Rngs(0))
    drop = EncoderDecoderLM(t5(dropout=rate, attention_dropout=rate, mlp_dropout=rate), rngs=nnx.Rngs(0))
    src = jax.random.randint(jax.random.PRNGKey(1), (4, 24), 2, 97)
    tgt = jax.random.randint(jax.random.PRNGKey(2), (4, 8), 2, 97)
    np.testing.assert_array_equal(drop(src, tgt), plain(src, tgt))
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    memory = np.asarray(drop.encode(src, dropout_keys=keys))
    assert abs(np.mean(memory == 0) - rate) < 0.03
    assert np.mean(np.asarray(plain.encode(src, dropout_keys=keys)) == 0) == 0  # rate 0: keys change nothing
    logits = drop(src, tgt, dropout_keys=keys)
    assert not np.allclose(logits, plain(src, tgt), atol=1e-3)
    np.testing.assert_array_equal(drop(src[1:], tgt[1:], dropout_keys=keys[1:]), logits[1:])  # per-row masks


def test_decode_reads_out_one_position_per_row_with_last():
    model = EncoderDecoderLM(t5(), rngs=nnx.Rngs(0))
    src = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 2, 97)
    tgt = jax.random.randint(jax.random.PRNGKey(2), (3, 6), 2, 97)
    memory = model.encode(src)
    full, _ = model.decode(tgt, memory=memory)
    last = np.asarray([5, 0, 2])
    one, _ = model.decode(tgt, memory=memory, last=last)
    assert one.shape == (3, 1, 97)
    np.testing.assert_allclose(one[:, 0], full[np.arange(3), last], atol=1e-6)
