"""How fast does a config train here, and how close is that to the machine's matmul speed?

Measures training tokens/s of CONFIG on its mesh (`mesh:` section; default: data
parallel over every device) on random tokens (the data pipeline is not timed),
and model-FLOPs utilisation against the dense matmul throughput that this script
measures on one device in the same run, times the devices used; and memory: the
compiled step's per-device peak (XLA's memory analysis, as `jaxlm plan --compiled`)
and this process's peak resident set.

    python experiments/bench_train.py configs/llama_tiny.yaml [overrides] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import load_config
from jaxlm.flops import train_flops_per_token
from jaxlm.nn.models import count_params
from jaxlm.plan import compiled_memory
from jaxlm.train.sharded import ShardedTraining


def matmul_flops_per_s(dtype, n: int = 2048, reps: int = 10) -> float:
    """Dense (n x n) @ (n x n) throughput: the machine's practical peak for this dtype."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def measure(cfg, steps: int) -> dict:
    """Compile time, step time and tokens/s of training `cfg` on its mesh (random tokens)."""
    mc, tc = cfg.model, cfg.train
    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    rng = np.random.default_rng(0)
    host = {
        k: rng.integers(0, mc.vocab_size, (tc.batch_size, cfg.data.seq_len)).astype(np.int32)
        for k in ("inputs", "targets")
    }
    lo, hi = sharded.rows
    batch = sharded.put_batch({k: v[lo:hi] for k, v in host.items()})
    t = time.perf_counter()
    state, m = sharded.train_step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, m = sharded.train_step(state, batch)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / steps
    tokens = tc.batch_size * cfg.data.seq_len
    return {
        "mesh": sharded.describe(),
        "tokens_per_step": tokens,
        "compile_s": round(compile_s, 2),
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s": round(tokens / step_s),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    p.add_argument("--matmul-size", type=int, default=2048)
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides)
    mc = cfg.model
    out = {"config": args.config, "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"}
    out.update(measure(cfg, args.steps))
    out["params"] = count_params(mc)
    if cfg.train.objective == "clm":
        out["compiled_peak_mib_per_device"] = round(compiled_memory(cfg)["peak"] / 2**20, 1)
    out["process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    n = int(out["mesh"].split(" on ")[1].split()[0])
    model_flops = train_flops_per_token(mc, cfg.data.seq_len) * out["tokens_per_s"]
    peak = n * matmul_flops_per_s(jnp.dtype(mc.dtype), args.matmul_size)  # per-device peak x devices used
    out.update(
        model_tflops_per_s=round(model_flops / 1e12, 4),
        matmul_tflops_per_s=round(peak / 1e12, 4),
        mfu_vs_measured_matmul=round(model_flops / peak, 3),
    )
    for k, v in out.items():
        print(f"{k:>24}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
