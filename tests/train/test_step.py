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
