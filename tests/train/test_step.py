import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxlm.nn.transformer import TransformerLM
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.step import init_train_state, make_train_step


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    cfg = tiny_config("llama_tiny")
    model = TransformerLM(cfg.model, rngs=nnx.Rngs(0))
    graphdef, tx = nnx.graphdef(model), make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 256, (8, 32)).astype(np.int32) for k in ("inputs", "targets")}
    results = []
    for accum in (1, 4):
        state = init_train_state(model, tx, 0)
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=accum))
        for _ in range(3):
            state, metrics = step(state, batch)
        results.append((state.params, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_router_losses_join_the_loss_and_the_metrics(tiny_config):
    """With experts, the step minimises cross-entropy + aux_loss_weight * balancing loss + z weight * z-loss:
    the reported loss is the sum, the router's gradient changes with the weights, and the metrics report each."""
    from jaxlm.nn.moe import router_losses, router_stats
    from jaxlm.ops.losses import cross_entropy

    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 256, (4, 32)).astype(np.int32) for k in ("inputs", "targets")}
    cfg = tiny_config("llama_tiny")
    moe = dataclasses.replace(cfg.model, num_experts=4, experts_per_token=2, expert_mlp_dim=32)
    out = {}
    for aux, z in ((0.0, 0.0), (0.5, 0.1)):
        m = dataclasses.replace(moe, aux_loss_weight=aux, router_z_loss_weight=z)
        model = TransformerLM(m, rngs=nnx.Rngs(0))
        graphdef, tx = nnx.graphdef(model), make_optimizer(cfg.train)
        state = init_train_state(model, tx, 0)
        new, metrics = jax.jit(make_train_step(graphdef, tx))(state, batch)
        out[aux] = (state, new, metrics, model)
    (_, _, m0, _), (_, _, m1, model1) = out[0.0], out[0.5]
    with router_stats() as found:
        logits, _ = model1(batch["inputs"])
    penalty, stats = router_losses(found, model1.cfg)
    total, count = cross_entropy(logits, batch["targets"])
    np.testing.assert_allclose(float(m1["loss"]), float(total / count + penalty), rtol=1e-5)
    np.testing.assert_allclose(float(m0["loss"]), float(total / count), rtol=1e-5)
    for key in ("moe_aux_loss", "moe_z_loss", "moe_imbalance", "moe_dropped"):
        np.testing.assert_allclose(float(m1[key]), float(stats[key]), rtol=1e-5)
    assert float(m1["moe_aux_loss"]) >= 2.0 - 1e-3  # k for a uniform router, more when unbalanced
    assert abs(float(m1["grad_norm"]) - float(m0["grad_norm"])) > 1e-4  # the routers' losses have gradients


def test_router_balance_moves_each_expert_bias_towards_the_mean_load(tiny_config):
    """DeepSeek-V3's loss-free balancing: after a step, an expert above its layer's mean load has its selection
    bias lowered by the rate, one below raised; gradients and weight decay leave the bias alone."""
    from jaxlm.nn.moe import router_stats

    rng = np.random.default_rng(1)
    batch = {k: rng.integers(0, 256, (4, 32)).astype(np.int32) for k in ("inputs", "targets")}
    cfg = tiny_config("llama_tiny", "train.weight_decay=0.5")
    m = dataclasses.replace(
        cfg.model, num_experts=4, experts_per_token=1, router="sigmoid", router_balance=True, router_balance_rate=0.01
    )
    model = TransformerLM(m, rngs=nnx.Rngs(0))
    with router_stats() as found:
        model(batch["inputs"])
    load = np.asarray(found[0]["load"], np.float32)  # (layers, E)
    graphdef, tx = nnx.graphdef(model), make_optimizer(cfg.train)
    state = init_train_state(model, tx, 0)
    new, _ = jax.jit(make_train_step(graphdef, tx))(state, batch)
    moved = np.asarray(new.params["stack"]["layers"]["moe"]["router_balance"][...])
    want = 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(moved, want, atol=1e-7)
    assert np.abs(want).sum() > 0


def test_weight_decay_applies_to_matrices_stacked_or_not():
    """The decay mask reads logical axes: a stacked layer's norm scale (layers, D), an expert's bias (layers,
    experts, F) and the routers' balance (layers, E) are vectors; projections, experts and the token table are
    matrices."""
    from jaxlm.config import ModelConfig
    from jaxlm.train.optimizer import decay_mask

    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_seq_len=32)
    cfg = dataclasses.replace(cfg, num_experts=4, mlp_bias=True, router="sigmoid", router_balance=True)
    state = nnx.state(TransformerLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mask = {
        "/".join(str(getattr(k, "key", k)) for k in path): bool(v)
        for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(state))
    }
    kept = {"stack/final_norm/scale", "stack/layers/attn_norm/scale", "stack/layers/mlp_norm/scale"}
    kept |= {f"stack/layers/moe/{n}" for n in ("b_gate", "b_up", "b_out", "router_balance")}
    assert {name.removesuffix("/.value") for name, decays in mask.items() if not decays} == kept
