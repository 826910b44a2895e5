"""Mixture-of-experts layer speed: forward + backward of a Qwen3-MoE-shaped feed-forward layer against the dense
gated MLP of equal active FLOPs, in one run on this machine.

The layer: D model width, E experts of hidden F, k a token (Qwen3-30B-A3B's ratios, scaled down: 128 experts,
8 a token, 768 = 0.375 D). The dense reference is a gated MLP of hidden k * F on the same tokens: the FLOPs a
token's experts do. Each expert implementation (`jaxlm.ops.moe.expert_mlp`) runs router + dispatch + experts +
combine:

- dropless: the CPU default (`expert_impl: blocks`); at these sizes (256 rows an expert) the split layout: one
  batched (E, C, D) x (E, D, F) matmul over each expert's first C = mean-load rows, and a loop of 32-row blocks
  over the overflow (`jaxlm.ops.moe.split_layout`);
- ragged: dropless, `jax.lax.ragged_dot` (XLA:CPU computes every expert, masked);
- capacity 1.25: at most 1.25 x the mean load an expert, the rest dropped (one batched matmul).

Rates are active FLOPs (3 matmuls, 2 M D kF each; x3 for forward + backward) over the best of --repeats
timings.

    python experiments/bench_moe.py [--tokens 2048] [--d-model 512] [--experts 32] [--k 4] [--hidden 192]

Writes experiments/results/bench_moe.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, bars, save  # noqa: E402

from jaxlm.ops.mlp import gated_mlp  # noqa: E402
from jaxlm.ops.moe import expert_mlp, route  # noqa: E402


def best_time(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS / "bench_moe"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    M, D, E, k, F = a.tokens, a.d_model, a.experts, a.k, a.hidden
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(keys[0], (M, D))
    router = jax.random.normal(keys[1], (D, E)) * D**-0.5
    wg, wu = (jax.random.normal(keys[i], (E, D, F)) * D**-0.5 for i in (2, 3))
    wo = jax.random.normal(keys[4], (E, F, D)) * F**-0.5
    dg, du = (jax.random.normal(keys[i], (D, k * F)) * D**-0.5 for i in (5, 6))
    do = jax.random.normal(keys[7], (k * F, D)) * (k * F) ** -0.5
    flops = 3 * 2 * M * D * k * F  # active, forward

    def dense(x, dg, du, do):
        return jnp.sum(jnp.sin(gated_mlp(x, dg, du, do)))

    def moe(impl, capacity_factor=0.0):
        def f(x, router, wg, wu, wo):
            y, _ = expert_mlp(x, route(x @ router, k), (wg, wu), wo, impl=impl, capacity_factor=capacity_factor)
            return jnp.sum(jnp.sin(y))

        return f

    rows = {}
    cases = [("dense MLP", dense, (x, dg, du, do))]
    cases += [
        (name, moe(*spec), (x, router, wg, wu, wo))
        for name, spec in [("dropless", ("blocks",)), ("ragged", ("ragged",)), ("capacity 1.25", ("blocks", 1.25))]
    ]
    for name, f, args in cases:
        fwd = best_time(jax.jit(f), args, a.repeats)
        both = best_time(jax.jit(jax.grad(f, argnums=tuple(range(len(args))))), args, a.repeats)
        rows[name] = {
            "forward_ms": round(fwd * 1e3, 2),
            "forward_backward_ms": round(both * 1e3, 2),
            "forward_gflops": round(flops / fwd / 1e9, 1),
            "forward_backward_gflops": round(3 * flops / both / 1e9, 1),
        }
        print(
            f"{name:>14}: forward {fwd * 1e3:7.1f} ms {flops / fwd / 1e9:6.1f} GFLOP/s | forward+backward "
            f"{both * 1e3:7.1f} ms {3 * flops / both / 1e9:6.1f} GFLOP/s",
            flush=True,
        )
    base = rows["dense MLP"]
    for r in rows.values():
        r["forward_vs_dense"] = round(base["forward_ms"] / r["forward_ms"], 3)
        r["forward_backward_vs_dense"] = round(base["forward_backward_ms"] / r["forward_backward_ms"], 3)
    print(
        "forward+backward rate against the dense MLP: "
        + ", ".join(f"{n} {r['forward_backward_vs_dense']:.2f}x" for n, r in rows.items())
    )
    shape = dict(tokens=M, d_model=D, experts=E, experts_per_token=k, expert_hidden=F, backend=jax.default_backend())
    names = list(rows)
    fig = bars(
        names,
        [rows[n]["forward_backward_gflops"] for n in names],
        ylabel="active GFLOP/s (fwd+bwd)",
        title=f"MoE layer M={M} D={D} E={E} k={k} F={F} vs dense MLP hidden {k * F}",
        size=(6, 3),
    )
    save(Path(a.out), {"shape": shape, "rows": rows}, fig, started=started)


if __name__ == "__main__":
    main()
