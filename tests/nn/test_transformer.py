import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import PRESETS, load_config
from jaxlm.nn.transformer import TransformerLM

AXES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", None, "layers"}


def tiny(base, **kw):
    cfg = load_config(f"configs/{base}.yaml").model
    return dataclasses.replace(
        cfg, vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_seq_len=32, **kw
    )


FAMILIES = {
    "gpt": dict(base="gpt_tiny"),
    "llama": dict(base="llama_tiny", num_kv_heads=2),
    "mqa": dict(base="llama_tiny", num_kv_heads=1),
    "post_norm_sinusoidal": dict(base="gpt_tiny", norm_position="post", position="sinusoidal"),
    "sliding": dict(base="llama_tiny", num_kv_heads=2, sliding_window=4),
    "alibi": dict(base="llama_tiny", position="alibi"),
    "yarn": dict(base="llama_tiny", rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8),
    "llama3_rope": dict(base="llama_tiny", rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8),
}


def build(name):
    kw = dict(FAMILIES[name])
    return TransformerLM(tiny(kw.pop("base"), **kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_causality(name):
    model = build(name)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 97)
    base, _ = model(tokens)
    for t in (0, 5, 11):
        changed, _ = model(tokens.at[:, t].set((tokens[:, t] + 1) % 97))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert not np.allclose(changed[:, t], base[:, t])


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_prefill_and_decode_equal_full_forward(name):
    model = build(name)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, 97)
    full, _ = model(tokens)
    cache = model.init_cache(2, 16)
    pre, cache = model(tokens[:, :6], cache=cache, cache_index=0)
    steps = [pre]
    for t in range(6, 10):
        pos = jnp.full((2, 1), t)
        out, cache = model(tokens[:, t : t + 1], pos, cache=cache, cache_index=t)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


def test_padding_tokens_do_not_change_other_rows_or_tokens():
    model = build("llama")
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 0, 97)
    ref, _ = model(tokens)
    # Same sequence left-padded by 3 junk tokens that are marked invalid.
    padded = jnp.concatenate([jnp.full((1, 3), 5), tokens], 1)
    pos = jnp.maximum(jnp.arange(11) - 3, 0)[None]
    valid = (jnp.arange(11) >= 3)[None]
    out, _ = model(padded, pos, valid)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def test_every_parameter_has_logical_axes():
    model = build("gpt")
    for path, p in nnx.iter_graph(model):
        if isinstance(p, nnx.Param):
            axes = p.get_metadata()["out_sharding"]
            assert len(axes) == p[...].ndim and set(axes) <= AXES, (path, axes)
            assert ("layers" in path) == (axes[0] == "layers"), (path, axes)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_without_allocating(name):
    cfg = PRESETS[name]
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 16), jnp.int32))[0], state)
    assert logits.shape == (1, 16, cfg.vocab_size)


@pytest.mark.parametrize("name", ["gpt", "post_norm_sinusoidal"])
def test_dropout_only_with_row_keys(name):
    """Without keys (evaluation, decoding) a model with dropout computes exactly the model without."""
    kw = dict(FAMILIES[name])
    base = kw.pop("base")
    plain = TransformerLM(tiny(base, **kw), rngs=nnx.Rngs(0))
    drop = TransformerLM(tiny(base, dropout=0.2, attention_dropout=0.2, mlp_dropout=0.2, **kw), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 97)
    want = plain(tokens)[0]
    np.testing.assert_array_equal(drop(tokens)[0], want)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    a, b = drop(tokens, dropout_keys=keys)[0], drop(tokens, dropout_keys=jax.random.split(jax.random.PRNGKey(3), 3))
    assert not np.allclose(a, want, atol=1e-3) and not np.allclose(a, b[0], atol=1e-3)
    np.testing.assert_array_equal(drop(tokens[1:], dropout_keys=keys[1:])[0], a[1:])  # per-row masks
    np.testing.assert_array_equal(plain(tokens, dropout_keys=keys)[0], want)  # rate 0: keys change nothing


def test_read_out_at_one_position_per_row_equals_the_full_logits_there():
    """`last=` (the engine's prefill reads out only the sampled position) gives row b's logits at last[b]."""
    model = build("llama")
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 9), 0, 97)
    last = jnp.asarray([8, 0, 4])
    full, _ = model(tokens)
    one, _ = model(tokens, last=last)
    assert one.shape == (3, 1, 97)
    np.testing.assert_allclose(one[:, 0], full[jnp.arange(3), last], atol=1e-6)
