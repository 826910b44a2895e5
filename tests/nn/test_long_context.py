"""Long-context settings change how a model computes, never what: blockwise attention and the chunked read-out
equal the reference in every model class, forward, gradients and cached decoding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.nn.models import build_model
from jaxlm.ops.losses import token_nll
from tests.nn.test_fields import CLASSES, LOCAL, MLA, randomized

BLOCKWISE = dict(attention_impl="blockwise", attention_block=4)  # 12 tokens: 3 tiles a side
VARIANTS = {
    "rope": {},
    "learned": dict(position="learned"),
    "alibi": dict(position="alibi"),
    "relative": dict(position="relative"),
    "local and global": LOCAL,
    "softcap and sinks": dict(attn_logit_softcap=0.5, attention_sinks=True),
    "latent": MLA,
}
T, SRC = 12, 7
tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 61)
valid = jnp.arange(T)[None] < jnp.array([[T], [9]])  # row 1 padded


def forward(model, cfg):
    if cfg.decoder_layers:
        return model(tokens[:, :SRC], tokens, None, valid)
    return model(tokens, valid=valid)[0]


def loss(model, cfg):
    """Summed next-token cross-entropy through `readout`, as training computes it."""
    if cfg.decoder_layers:
        x = model.hidden(tokens[:, :SRC], tokens, None, valid)
    else:
        x, _ = model.hidden(tokens, valid=valid)
    nll = model.readout(functools.partial(token_nll, z_loss=1e-3), x, jnp.roll(tokens, -1, axis=1))
    return jnp.sum(jnp.where(valid, nll, 0.0))


# Every variant in a decoder; in the other classes those whose masks or biases differ there (bidirectional).
CASES = [("decoder", v) for v in VARIANTS] + [
    (kind, v) for kind in ("encoder", "encoder-decoder") for v in ("rope", "relative", "local and global", "alibi")
]


@pytest.mark.parametrize("kind, variant", CASES)
def test_blockwise_equals_the_reference(kind, variant):
    cfg = ModelConfig(**{**CLASSES[kind], **VARIANTS[variant]})
    ref, got = (forward(randomized(c), c) for c in (cfg, dataclasses.replace(cfg, **BLOCKWISE)))
    rows = valid[:, :, None]  # padding queries differ by design (zero there, the mean of v in the reference)
    np.testing.assert_allclose(jnp.where(rows, got, 0), jnp.where(rows, ref, 0), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", CLASSES)
def test_blockwise_and_chunked_loss_gradients_equal_the_reference(kind):
    cfg = ModelConfig(**{**CLASSES[kind], **LOCAL, "position": "relative" if kind != "decoder" else "rope"})
    fast = dataclasses.replace(cfg, **BLOCKWISE, logits_chunk=5)  # 5 does not divide 12: padded
    results = []
    for c in (cfg, fast):
        model = randomized(c)
        graphdef, params = nnx.split(model)
        results.append(jax.value_and_grad(lambda p, c=c, g=graphdef: loss(nnx.merge(g, p), c))(params))
    (ref, ref_grads), (got, got_grads) = results
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for (path, g), (_, r) in zip(
        jax.tree_util.tree_leaves_with_path(got_grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    ):
        scale = float(jnp.max(jnp.abs(r))) + 1e-6
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_chunked_readout_equals_the_whole_read_out():
    cfg = ModelConfig(**CLASSES["decoder"])
    model = randomized(cfg)
    x, _ = model.hidden(tokens)

    def stats(logits, targets):
        return token_nll(logits, targets), jax.nn.logsumexp(logits, axis=-1)

    whole = model.readout(stats, x, tokens)
    for chunk in (1, 5, 12, 100):
        chunked = randomized(dataclasses.replace(cfg, logits_chunk=chunk)).readout(stats, x, tokens)
        for a, b in zip(chunked, whole):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("variant", ["rope", "local and global", "latent"])
def test_blockwise_cached_prefill_and_decode_equal_the_full_forward(variant):
    cfg = ModelConfig(**{**CLASSES["decoder"], **VARIANTS[variant], **BLOCKWISE})
    model = randomized(cfg)
    full, _ = model(tokens)
    cache = model.init_cache(2, 16)
    pre, cache = model(tokens[:, :10], cache=cache, cache_index=0)  # 10 queries: blockwise over the cache
    steps = [pre]
    for t in range(10, T):
        out, cache = model(tokens[:, t : t + 1], jnp.full((2, 1), t), cache=cache, cache_index=t)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "change, names",
    [
        (dict(attention_block=0), "model.attention_block"),
        (dict(logits_chunk=-1), "model.logits_chunk"),
        (dict(attention_impl="blockwise", attention_dropout=0.1), "model.attention_dropout"),
    ],
)
def test_bad_settings_are_refused_by_name(change, names):
    with pytest.raises(ConfigError, match=names):
        ModelConfig(**{**CLASSES["decoder"], **change})


def test_training_memory_is_linear_in_the_sequence_length():
    """The compiled gradient of the loss at T = 4096: blockwise attention and the chunked read-out need a small
    fraction of the reference's temporary memory (its (B, N, T, S) scores and (B, T, V) logits)."""
    long = jnp.zeros((1, 4096), jnp.int32)

    def temp_bytes(**change):
        cfg = ModelConfig(**{**CLASSES["decoder"], "max_seq_len": 4096, "vocab_size": 4096, **change})
        graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))

        def f(p):
            model = nnx.merge(graphdef, p)
            return jnp.sum(model.readout(token_nll, model.hidden(long)[0], long))

        return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes

    reference = temp_bytes()
    linear = temp_bytes(attention_impl="blockwise", attention_block=256, logits_chunk=256)
    assert linear * 8 < reference, (linear, reference)


def test_the_engine_prefills_a_long_prompt_blockwise_in_chunks():
    """A prompt of 100 tokens prefilled 16 at a time through the paged cache (blockwise over the rows' blocks):
    the same greedy continuation as the reference attention."""
    from jaxlm.generate import Generator

    cfg = ModelConfig(**{**CLASSES["decoder"], "max_seq_len": 160})
    prompt = [int(t) for t in jax.random.randint(jax.random.PRNGKey(3), (100,), 0, 61)]
    outs = []
    for c in (cfg, dataclasses.replace(cfg, attention_impl="blockwise", attention_block=16)):
        outs.append(Generator(randomized(c), chunk=16).generate([prompt], max_new_tokens=6, temperature=0.0))
    assert outs[0] == outs[1]


def test_preference_and_policy_log_probs_read_out_in_chunks():
    """DPO's sequence log-probs and PPO/GRPO's per-token log-probs and entropies, with the read-out chunked, equal
    the whole read-out's (their gradients too: the losses are sums of them)."""
    from jaxlm.train.policy_gradient import policy_outputs
    from jaxlm.train.preference import sequence_logprobs

    cfg = ModelConfig(**{**CLASSES["decoder"], "value_head": True})
    pairs = {"tokens": tokens.reshape(1, 2, T), "valid": valid.reshape(1, 2, T), "mask": valid.reshape(1, 2, T)}

    def outputs(c):
        graphdef, params = nnx.split(randomized(c))

        def f(p):
            model = nnx.merge(graphdef, p)
            logp, _ = sequence_logprobs(model, pairs)
            token_logp, entropy, values = policy_outputs(model, tokens, valid, temperature=0.7, values=True)
            return jnp.sum(logp) + jnp.sum(token_logp * 0.3 + entropy * 0.1) + jnp.sum(values), (logp, entropy)

        return jax.value_and_grad(f, has_aux=True)(params)

    (whole, (logp, entropy)), grads = outputs(cfg)
    (got, (c_logp, c_entropy)), c_grads = outputs(dataclasses.replace(cfg, logits_chunk=4))
    np.testing.assert_allclose(got, whole, rtol=1e-6)
    np.testing.assert_allclose(c_logp, logp, rtol=1e-6)
    np.testing.assert_allclose(c_entropy, entropy, rtol=1e-6, atol=1e-6)
    for g, r in zip(jax.tree.leaves(c_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * (float(jnp.max(jnp.abs(r))) + 1))
