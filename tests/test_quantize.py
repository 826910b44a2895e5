"""`--weights f32|bf16|int8|nf4`: a loaded model's weights stored for inference; logits stay close to float32
(equal for f32 strips), the engine's batched output equals each prompt alone, bytes shrink, the CPU default is
f32 strips, and bad choices are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import kernels
from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.engine import DecodeSteps, Engine, Request
from jaxlm.nn import TransformerLM, adapters
from jaxlm.nn.quantized import BF16Table, BF16Weight, F32Table, F32Weight, Int8Table, Int8Weight, NF4Weight, Quantized
from jaxlm.quantize import default_weights, store_weights, weight_bytes


def model_for(base, **kw):
    """A tiny random model; d_model 64 and vocabulary 128 make every weight span more than one 64-column strip."""
    settings = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, mlp_dim=128, init_std=0.3) | kw
    return TransformerLM(dataclasses.replace(load_config(f"configs/{base}.yaml").model, **settings), rngs=nnx.Rngs(0))


TOKENS = jnp.array([[5, 17, 99, 3, 64, 120, 7, 42]])


def logits(model):
    return model(TOKENS)[0]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "weights,kind,tol", [("bf16", BF16Weight, 0.02), ("int8", Int8Weight, 0.03), ("nf4", NF4Weight, 0.3)]
)
def test_quantized_logits_stay_close(tied, weights, kind, tol):
    model = model_for("llama_tiny", max_seq_len=48, tie_embeddings=tied, init_std=0.05)
    want = logits(model)
    store_weights(model, weights)
    assert isinstance(model.stack.layers.attn.wq, kind) and isinstance(model.stack.layers.mlp.w_out, kind)
    assert isinstance(model.embed.embedding, BF16Table if weights == "bf16" else Int8Table)
    assert tied or isinstance(model.lm_head, BF16Weight if weights == "bf16" else Int8Weight)
    got = logits(model)
    rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < rel < tol


def test_a_plain_mlp_is_stored_too():
    """A GPT-2 MLP (w_in, w_out, no gate): every projection it has is stored, none it lacks is asked for."""
    model = model_for("gpt_tiny", max_seq_len=48, init_std=0.05)
    want = logits(model)
    store_weights(model, "int8")
    mlp = model.stack.layers.mlp
    assert isinstance(mlp.w_in, Int8Weight) and isinstance(mlp.w_out, Int8Weight) and not hasattr(mlp, "w_gate")
    assert float(jnp.max(jnp.abs(logits(model) - want)) / jnp.max(jnp.abs(want))) < 0.03


@pytest.mark.parametrize("weights,kind,tol", [("int8", Int8Weight, 0.03), ("nf4", NF4Weight, 0.3)])
def test_a_mixtures_experts_are_stored_each_expert_apart(weights, kind, tol):
    """--weights int8|nf4 store a mixture's expert stacks too, each expert with its own scales: an expert 100
    times larger than the others leaves theirs as precise. f32 strips leave the experts (no kernel reads them)."""
    model = model_for("moe_tiny", max_seq_len=48, init_std=0.05, expert_mlp_dim=64)
    moe = model.stack.layers.moe
    moe.w_up.set_value(moe.w_up[...].at[:, 0].multiply(100.0))
    want, w_up = logits(model), np.asarray(moe.w_up[...])
    store_weights(model, weights)
    for name in ("w_gate", "w_up", "w_out"):
        w = getattr(moe, name)
        assert isinstance(w, kind) and w.experts and w.shape[0] == 8 and w[...].shape == (2, *w.shape)
    # expert 1's error is small against its own size (scales shared with expert 0 would make it ~100x larger)
    err = np.abs(np.asarray(moe.w_up[...])[:, 1] - w_up[:, 1]).max() / np.abs(w_up[:, 1]).max()
    assert 0 < err < (0.01 if weights == "int8" else 0.2)
    got = logits(model)
    assert 0 < float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < tol
    f32 = store_weights(model_for("moe_tiny", max_seq_len=48), "f32")
    assert isinstance(f32.stack.layers.moe.w_up, nnx.Param) and isinstance(f32.stack.layers.attn.wq, F32Weight)


def test_a_quantized_expert_stack_is_not_a_matmul_operand():
    w = Int8Weight(jnp.ones((4, 8, 64)), n_in=1, experts=True)
    with pytest.raises(ValueError, match="expert stack"):
        w.matmul(jnp.ones((2, 8)), 1)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_strips_hold_the_same_weights(tied):
    """f32: the same values in the kernels' layout; the logits equal float32's up to summation order."""
    model = model_for("llama_tiny", max_seq_len=48, tie_embeddings=tied, init_std=0.05)
    wq, table = model.stack.layers.attn.wq[...], model.embed.embedding[...]
    want = logits(model)
    store_weights(model, "f32")
    assert isinstance(model.stack.layers.attn.wq, F32Weight) and isinstance(model.embed.embedding, F32Table)
    assert tied or isinstance(model.lm_head, F32Weight)
    np.testing.assert_array_equal(model.stack.layers.attn.wq[...], wq)
    np.testing.assert_array_equal(model.embed.embedding[...], table)
    np.testing.assert_allclose(logits(model), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_default_weights_are_f32_strips_where_the_kernels_run(monkeypatch):
    model = model_for("llama_tiny", max_seq_len=48)
    assert default_weights(model) == ("f32" if kernels.available() else None)
    assert default_weights(store_weights(model, "int8")) is None  # already stored otherwise
    assert default_weights(model_for("llama_tiny", max_seq_len=48, param_dtype="bfloat16")) is None
    monkeypatch.setattr(kernels, "available", lambda: False)  # no compiler, JAXLM_KERNELS=0
    assert default_weights(model_for("llama_tiny", max_seq_len=48)) is None


def test_bytes_per_parameter():
    sizes = {}
    for weights in (None, "f32", "bf16", "int8", "nf4"):
        model = model_for("llama_tiny", max_seq_len=48, d_model=256, mlp_dim=512)  # NF4 pads to 16,384
        sizes[weights] = weight_bytes(store_weights(model, weights))
    params = sizes[None]["params"]
    assert all(s["params"] == params for s in sizes.values())  # the same parameters, stored otherwise
    per = {k: s["bytes"] / params for k, s in sizes.items()}
    assert per[None] == per["f32"] == 4 and per["bf16"] == 2
    assert 1.0 < per["int8"] < 1.2 and per["nf4"] < 0.8 * per["int8"]


def test_bf16_stores_every_float_parameter_in_bf16():
    model = store_weights(model_for("llama_tiny", max_seq_len=48), "bf16")
    leaves = [v[...] for _, v in nnx.iter_graph(model) if isinstance(v, (nnx.Param, Quantized))]
    assert leaves and {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert logits(model).dtype == jnp.float32  # computed in the model's dtype


@pytest.mark.parametrize("weights", ["f32", "int8", "nf4"])
def test_weights_that_take_the_same_input_share_one_call(weights, monkeypatch):
    """q, k, v (and a gated MLP's gate and up) in one kernel call: 4 calls a layer where there were 7, the same
    logits bit for bit (each strip is computed as before)."""
    if not kernels.available():
        pytest.skip("no native kernels: XLA's dots, nothing to fuse")
    model = store_weights(model_for("llama_tiny", max_seq_len=48), weights)
    graph, state = nnx.split(model)

    def run():
        fn = jax.jit(lambda state, tokens: nnx.merge(graph, state)(tokens)[0])
        calls = fn.lower(state, TOKENS).as_text().count("stablehlo.custom_call @jaxlm_")
        return calls, fn(state, TOKENS)

    calls, got = run()
    monkeypatch.setattr(adapters, "fusable", lambda ws: False)
    calls_apart, want = run()
    assert calls > 1 and (calls - 1) * 7 == (calls_apart - 1) * 4  # the read-out is one call either way
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("weights", ["f32", "bf16", "int8", "nf4", "moe-nf4"])
def test_engine_batch_equals_each_prompt_alone(weights):
    base = "moe_tiny" if weights.startswith("moe-") else "llama_tiny"
    model = store_weights(model_for(base, max_seq_len=48), weights.removeprefix("moe-"))
    steps = DecodeSteps(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 128, n).tolist() for n in (3, 19, 7, 11)]

    def run(requests, slots):
        e = Engine(steps, slots=slots, chunk=8)
        for r in requests:
            e.submit(r)
        e.run()
        return [(r.tokens, r.token_logprobs) for r in requests]

    batched = run([Request(p, 10, temperature=0.0, logprobs=1) for p in prompts], slots=4)
    for p, (tokens, lps) in zip(prompts, batched):
        alone_tokens, alone_lps = run([Request(p, 10, temperature=0.0, logprobs=1)], slots=1)[0]
        assert tokens == alone_tokens
        np.testing.assert_allclose(lps, alone_lps, atol=1e-4)


def test_unknown_weights_are_refused():
    with pytest.raises(ConfigError, match="int4.*stored, f32, bf16, int8, nf4"):
        store_weights(model_for("llama_tiny", max_seq_len=48), "int4")


def test_generate_cli_takes_weights(tiny_config, tmp_path, capsys):
    from jaxlm.train.trainer import train

    run = tmp_path / "run"
    train(tiny_config("llama_tiny", "train.steps=2", run_dir=run), progress=False)
    greedy = ["--prompt", "To be", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(["generate", str(run), *greedy, "--weights", "int8"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    outs = []
    for weights in ([], ["--weights", "stored"]):  # the default (f32 strips on CPU) and the model as stored
        assert main(["generate", str(run), *greedy, *weights]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(run), *greedy, "--weights", "int4"])
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [Int8Weight, NF4Weight, BF16Weight, F32Weight])
def test_an_input_of_another_width_is_refused(cls):
    """x is flattened to the weight's rows: (2, 12) against a (6, 64) weight would pass as 4 rows of 6."""
    w = cls(jnp.ones((6, 64), jnp.float32), n_in=1)
    assert w.matmul(jnp.ones((2, 6), jnp.float32), 1).shape == (2, 64)
    with pytest.raises(ValueError, match=r"x ends in \(12,\); the weight takes \(6,\)"):
        w.matmul(jnp.ones((2, 12), jnp.float32), 1)
