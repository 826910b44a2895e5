"""The pipeline schedules (GPipe and circular) equal running the layers one after another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.parallel.pipeline import pipeline, schedule


def layer(w, x, shift):
    """A layer that depends on its own weights and on its rows' extras."""
    return jnp.tanh(x @ w + shift[:, None, None])


def sequential(ws, x, shift):
    for w in ws:
        x = layer(w, x, shift)
    return x


def piped(ws, x, shift, **kw):
    def stage(chunk, x, shift):
        return jax.lax.scan(lambda x, w: (layer(w, x, shift), None), x, chunk)[0]

    return pipeline(stage, ws, x, shift, **kw)


@pytest.mark.parametrize(
    "stages,micro,repeats",
    [(2, 2, 1), (4, 3, 1), (2, 2, 2), (2, 4, 2), (4, 4, 2), (2, 2, 4), (1, 2, 1)],
)
def test_pipeline_equals_sequential_layers(stages, micro, repeats):
    rng = np.random.default_rng(0)
    L, B = 8, 12 if micro == 3 else 8
    ws = jnp.asarray(rng.normal(0, 0.5, (L, 6, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(B, 5, 6)), jnp.float32)
    shift = jnp.asarray(rng.normal(size=(B,)), jnp.float32)
    kw = dict(num_stages=stages, num_microbatches=micro, num_repeats=repeats)
    np.testing.assert_allclose(piped(ws, x, shift, **kw), sequential(ws, x, shift), rtol=1e-5, atol=1e-6)

    loss = lambda f: lambda ws, x: jnp.sum(f(ws, x, shift) ** 2)  # noqa: E731
    got = jax.grad(loss(lambda *a: piped(*a, **kw)), argnums=(0, 1))(ws, x)
    want = jax.grad(loss(sequential), argnums=(0, 1))(ws, x)
    for g, w in zip(got, want):  # summed in another order: float32 rounding of entries up to ~10
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stages,micro,repeats", [(2, 4, 1), (4, 8, 1), (2, 4, 2), (4, 8, 3)])
def test_schedule_visits_every_chunk_once_without_clashes(stages, micro, repeats):
    """Every (micro-batch, repeat) runs on every stage exactly once, in order, within M R + P - 1 iterations."""
    seen = {}
    for t in range(micro * repeats + stages - 1):
        m, r, busy = (np.asarray(a) for a in schedule(t, stages, micro, repeats))
        for s in np.flatnonzero(busy):
            key = (int(m[s]), int(r[s]) * stages + s)  # (micro-batch, virtual stage)
            assert key not in seen
            seen[key] = t
    assert len(seen) == micro * repeats * stages
    for (m, v), t in seen.items():
        if v:
            assert seen[(m, v - 1)] == t - 1  # the previous virtual stage ran one iteration earlier


def test_pipeline_rejects_impossible_splits():
    ws, x = jnp.zeros((6, 2, 2)), jnp.zeros((4, 3, 2))
    with pytest.raises(ValueError, match="6 layers"):
        piped(ws, x, jnp.zeros(4), num_stages=2, num_microbatches=2, num_repeats=2)
