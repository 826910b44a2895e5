"""PEFT on jaxlm models: LoRA B = 0 is the base, merge = unmerged, QLoRA = LoRA on dequantized weights,
only adapters train (base bit-identical, optimizer state of adapters only), prompt/prefix tuning with the cache."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, PeftConfig, load_config
from jaxlm.generate import Generator, generate_uncached
from jaxlm.nn.adapters import Adapter
from jaxlm.nn.models import build_model
from jaxlm.nn.quantized import NF4Weight
from jaxlm.peft import apply_peft, merge, unmerge
from jaxlm.train.sharded import ShardedTraining

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=32)


def _model(**kw):
    from jaxlm.config import ModelConfig

    return build_model(ModelConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0))


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, 64)


def _randomize_b(model):
    for path, v in nnx.to_flat_state(nnx.state(model, Adapter)):
        if path[-1] == "b":
            v.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(len(path)), v.shape))


@pytest.mark.parametrize("kw", [{}, dict(mlp="plain", activation="gelu", position="learned"), dict(decoder_layers=2)])
def test_lora_zero_b_is_base_and_merge_equals_unmerged(kw):
    tokens = _tokens()
    model = _model(**kw)
    run = (lambda m: m(tokens, tokens)) if kw.get("decoder_layers") else (lambda m: m(tokens)[0])
    base = run(model)
    targets = ("q", "k", "v", "o", "up", "down") + (("gate",) if kw.get("mlp", "gated") == "gated" else ())
    apply_peft(model, PeftConfig(method="lora", rank=4, targets=targets + ("embed",)), seed=1)
    np.testing.assert_array_equal(run(model), base)  # B = 0 (and A = 0 for the embedding): the base exactly
    _randomize_b(model)
    adapted = run(model)
    assert np.abs(adapted - base).max() > 1e-3
    merge(model)
    np.testing.assert_allclose(run(model), adapted, atol=1e-5)
    unmerge(model)
    np.testing.assert_allclose(run(model), adapted, atol=1e-5)


def test_unknown_target_and_tied_lm_head_are_refused():
    with pytest.raises(ConfigError, match="unknown LoRA target.*'qq'"):
        PeftConfig(method="lora", targets=("qq",))
    with pytest.raises(ConfigError, match="tied"):
        apply_peft(_model(tie_embeddings=True), PeftConfig(method="lora", targets=("lm_head",)))


def test_virtual_tokens_refuse_packed_rows_and_pipelines():
    sft = ["train.objective=sft", "data.source=shakespeare_instructions"]
    for method in ("prompt", "prefix"):
        with pytest.raises(ConfigError, match="data.pack=false"):
            load_config(None, [f"peft.method={method}", *sft])
        with pytest.raises(ConfigError, match="data.pack=false"):
            load_config(None, [f"peft.method={method}", "data.document_mask=true"])
        assert load_config(None, [f"peft.method={method}", *sft, "data.pack=false"]).peft.method == method
    with pytest.raises(ConfigError, match="mesh.pipeline=1"):
        load_config(None, ["peft.method=lora", "mesh.pipeline=2", "mesh.data=1"])


def test_qlora_equals_lora_on_dequantized_weights():
    tokens = _tokens()
    q = apply_peft(_model(), PeftConfig(method="qlora", rank=4), seed=1)
    _randomize_b(q)
    assert isinstance(q.stack.layers.attn.wq, NF4Weight)
    lora = apply_peft(_model(), PeftConfig(method="lora", rank=4), seed=1)
    _randomize_b(lora)
    for name in ("wq", "wk", "wv", "wo"):  # the LoRA model's base := the dequantized NF4 weights
        getattr(lora.stack.layers.attn, name).set_value(getattr(q.stack.layers.attn, name)[...])
    for name in ("w_gate", "w_up", "w_out"):
        getattr(lora.stack.layers.mlp, name).set_value(getattr(q.stack.layers.mlp, name)[...])
    np.testing.assert_allclose(q(tokens)[0], lora(tokens)[0], atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora", "prompt", "prefix", "lora on experts", "qlora on experts"])
def test_only_adapters_train(method, tiny_config):
    extra = []
    if method.endswith(" on experts"):  # a mixture of experts, its attention and every expert adapted
        method, extra = method.split()[0], ["model.num_experts=4", "model.expert_mlp_dim=16"]
        extra.append("peft.targets=[q,v,gate,up,down]")
    cfg = tiny_config(
        "llama_tiny", "peft.method=" + method, "peft.rank=4", "peft.virtual_tokens=4", "train.lr=1e-2", *extra
    )
    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    frozen0 = jax.device_get(state.frozen)
    params0 = jax.device_get(state.params)
    assert all(
        isinstance(v, Adapter) for v in jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    n_adapter = sum(x.size for x in jax.tree.leaves(params0))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * n_adapter  # Adam's two moments, of the adapters alone
    batch = {"inputs": np.arange(4 * 16).reshape(4, 16) % 50, "targets": (np.arange(4 * 16).reshape(4, 16) + 1) % 50}
    for _ in range(3):
        state, _ = sharded.train_step(state, sharded.put_batch(batch))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen0)  # bit for bit
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state.params), params0)
    assert any(jax.tree.leaves(changed))


def test_qlora_of_experts_equals_lora_on_their_dequantized_weights():
    """QLoRA stores a mixture's experts as NF4 too, each expert in its own blocks: the model equals the LoRA
    model whose experts (and attention) hold the dequantized values, per-expert LoRAs included."""
    tokens = _tokens()
    kw = dict(num_experts=4, expert_mlp_dim=64, d_model=64)
    targets = ("q", "gate", "up", "down")
    q = apply_peft(_model(**kw), PeftConfig(method="qlora", rank=4, targets=targets), seed=1)
    _randomize_b(q)
    moe = q.stack.layers.moe
    assert all(isinstance(getattr(moe, n), NF4Weight) for n in ("w_gate", "w_up", "w_out"))
    lora = apply_peft(_model(**kw), PeftConfig(method="lora", rank=4, targets=targets), seed=1)
    _randomize_b(lora)
    for owner, other, names in (
        (lora.stack.layers.attn, q.stack.layers.attn, ("wq", "wk", "wv", "wo")),
        (lora.stack.layers.moe, moe, ("w_gate", "w_up", "w_out")),
    ):
        for name in names:
            getattr(owner, name).set_value(getattr(other, name)[...])
    np.testing.assert_allclose(q(tokens)[0], lora(tokens)[0], atol=1e-5)
    base = _model(**kw)
    err = np.abs(np.asarray(moe.w_up[...]) - np.asarray(base.stack.layers.moe.w_up[...])).max()
    assert 0 < err < 0.2 * np.abs(np.asarray(base.stack.layers.moe.w_up[...])).max()  # 4 bits, not garbage


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_cached_generation_equals_recompute(method):
    model = apply_peft(_model(), PeftConfig(method=method, virtual_tokens=3, prefix_hidden=8), seed=2)
    prompt = [5, 9, 2, 7]
    want = generate_uncached(model, prompt, max_new_tokens=6)
    got = Generator(model).generate([prompt], max_new_tokens=6, temperature=0.0)[0]
    assert got == want


def test_prefix_reparameterization_folds_to_the_same_model():
    model = apply_peft(_model(), PeftConfig(method="prefix", virtual_tokens=3, prefix_hidden=8), seed=2)
    tokens = _tokens()
    before = model(tokens)[0]
    n_before = sum(x.size for x in jax.tree.leaves(nnx.state(model, Adapter)))
    model.stack.prefix.fold()
    np.testing.assert_allclose(model(tokens)[0], before, atol=1e-6)
    n_after = sum(x.size for x in jax.tree.leaves(nnx.state(model, Adapter)))
    assert n_after == 3 * 2 * 2 * 2 * 8 < n_before  # P x (L * 2 * K * H) left


def test_init_from_errors_and_shape_conflicts(tmp_path, tiny_config):
    from jaxlm.errors import DataError
    from jaxlm.train.finetune import grow_vocab, resolve
    from jaxlm.train.run_dir import load_base

    with pytest.raises(DataError, match="does not exist.*jaxlm train configs/llama_tiny.yaml"):
        load_base(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither config.yaml nor config.json"):
        load_base(str(tmp_path / "empty"))
    cfg = tiny_config("llama_tiny")
    base = dataclasses.replace(cfg.model, d_model=48, num_heads=4)
    with pytest.raises(ConfigError, match="model.d_model=32 \\(the base has 48\\)"):
        resolve(cfg, base)
    ok = resolve(load_config(None, ["model.dropout=0.1", "data.seq_len=16"]), base)
    assert ok.model.d_model == 48 and ok.model.dropout == 0.1
    params = nnx.state(_model(), nnx.Param)
    tiny = load_config(None, [f"model.{k}={v}" for k, v in TINY.items()] + ["data.seq_len=16"])
    grown_cfg, grown = grow_vocab(tiny, params, 66)
    table = np.asarray(grown["embed"]["embedding"][...])
    assert grown_cfg.model.vocab_size == 66 and table.shape == (66, 32)
    np.testing.assert_allclose(table[64], table[:64].mean(0), atol=1e-6)
    np.testing.assert_array_equal(table[:64], np.asarray(params["embed"]["embedding"][...]))


@pytest.mark.parametrize(
    "kw", [dict(num_experts=4, shared_experts=1), dict(num_experts=4, mlp="plain", capacity_factor=1.0)]
)
def test_lora_on_expert_weights(kw):
    """One LoRA per expert of each adapted expert weight: B = 0 is the base, the adapters get gradients, merge
    equals unmerged (peft's format of them: tests/hf/test_peft_experts.py)."""
    model = _model(**kw)
    tokens = _tokens()
    base = np.asarray(model(tokens)[0])
    targets = ("q", "v", "up", "down") if "mlp" in kw else ("q", "v", "gate", "up", "down")
    apply_peft(model, PeftConfig(method="lora", rank=4, targets=targets))
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]), base)
    names = {str(p[-2]) for p, _ in nnx.to_flat_state(nnx.state(model, Adapter)) if "moe" in map(str, p)}
    assert names == ({"lora_w_gate", "lora_w_up", "lora_w_out"} if "mlp" not in kw else {"lora_w_in", "lora_w_out"})
    _randomize_b(model)
    graphdef, adapters, rest = nnx.split(model, Adapter, ...)

    def loss(a):
        return nnx.merge(graphdef, a, rest)(tokens)[0].mean()

    grads = jax.grad(loss)(adapters)
    moe_grads = [v for p, v in nnx.to_flat_state(grads) if "moe" in map(str, p)]
    assert moe_grads and all(np.abs(np.asarray(g[...])).max() > 0 for g in moe_grads)
    adapted = np.asarray(model(tokens)[0])
    assert not np.allclose(adapted, base)
    merge(model)
    np.testing.assert_allclose(np.asarray(model(tokens)[0]), adapted, atol=1e-5)
