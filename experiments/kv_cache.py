"""Does the KV cache turn quadratic decoding linear? Time per generated token against context length,
with the cache and by recomputing the whole context.

For each context length L, a model with max_seq_len = L (the default llama_tiny shape, random weights:
speed does not depend on them) is timed two ways at a context of L - 1 tokens:
  cached      one decode step: the new token's projections plus attention over the L cached keys;
  recomputed  the forward pass over all L tokens (what generating without a cache costs per token).
Both are jitted once per length and timed over repeated steps, compilation excluded. The cached cost grows
linearly in L (attention reads L keys), the recomputed one at least linearly with a far larger slope
(every projection runs on L tokens) and quadratically in its attention.

    python experiments/kv_cache.py [--quick] [--lengths 64,128,256,512,1024] [--repeats 100]

Writes experiments/results/kv_cache.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import load_config
from jaxlm.engine import NO_BLOCK, DecodeSteps, Engine, Inputs, Request
from jaxlm.nn.transformer import TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, pyplot, save  # noqa: E402


def time_length(base, L: int, repeats: int) -> dict:
    cfg = dataclasses.replace(base, max_seq_len=L)
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = (np.arange(L) * 7 + 3) % cfg.vocab_size

    # Cached: fill a one-row cache with L - 1 tokens, then time the decode step writing token L - 1.
    steps = DecodeSteps(model)
    engine = Engine(steps, slots=1, chunk=L, window_shift=1)
    engine.submit(Request(tokens[: L - 1].tolist(), 1, temperature=0.0))
    engine.run()
    x = Inputs(1, 1, L, steps.words)
    x.tokens(0, [int(tokens[L - 1])], L - 1)
    x.row(0, Request([1], 1, temperature=0.0), index=L - 1)
    # The finished request's blocks went back to the pool, lowest ids first: blocks 0.. hold its L - 1 tokens.
    used = -(-L // steps.Z)
    table = np.full((1, min(steps.row_blocks, 1 << (used - 1).bit_length())), NO_BLOCK, np.int32)
    table[0, :used] = np.arange(used)
    x.row(0, Request([1], 1, temperature=0.0), index=L - 1, slot=0)
    args = (steps.weights, None, engine.cache, engine._no_prev, table, *x.arrays(1))
    out, _, cache = steps.decode(*args)
    jax.block_until_ready(out)

    def one_step(cache):
        # The same slot each time: the cache holds L - 1 tokens before every step.
        return steps.decode(steps.weights, None, cache, engine._no_prev, table, *x.arrays(1))

    t = time.perf_counter()
    for _ in range(repeats):
        out, _, cache = one_step(cache)
    jax.block_until_ready(out)
    cached = (time.perf_counter() - t) / repeats

    # Recomputed: the forward over all L tokens, next-token logits of the last.
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: jnp.argmax(nnx.merge(graphdef, p)(t[None])[0][0, -1]))
    ids = jnp.asarray(tokens, jnp.int32)
    forward(params, ids).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        r = forward(params, ids)
    r.block_until_ready()
    recomputed = (time.perf_counter() - t) / repeats
    return {"length": L, "cached_ms": round(cached * 1e3, 3), "recomputed_ms": round(recomputed * 1e3, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two short lengths, a tiny model: seconds")
    p.add_argument("--lengths", default="64,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "kv_cache"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    base = load_config("configs/llama_tiny.yaml").model
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        base = dataclasses.replace(base, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
        lengths, args.repeats = [16, 32], 3
    rows = []
    for L in lengths:
        rows.append(time_length(base, L, args.repeats))
        print(rows[-1], flush=True)
    first, last = rows[0], rows[-1]
    grow = lambda k: last[k] / first[k]  # noqa: E731
    summary = (
        f"from {first['length']} to {last['length']} tokens of context ({last['length'] // first['length']}x), a "
        f"cached token's time grows {grow('cached_ms'):.1f}x and a recomputed one's {grow('recomputed_ms'):.1f}x; "
        f"at {last['length']} the cache is {last['recomputed_ms'] / last['cached_ms']:.0f}x faster"
    )
    print(summary)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    L = [r["length"] for r in rows]
    ax.plot(L, [r["recomputed_ms"] for r in rows], "o-", label="recomputed (no cache)")
    ax.plot(L, [r["cached_ms"] for r in rows], "s-", label="KV cache")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per generated token")
    ax.set_xticks(L, [str(x) for x in L])
    ax.set_title("time per token vs context length", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    result = {"model": "llama_tiny shape" + (" (quick: tiny)" if args.quick else ""), "rows": rows, "summary": summary}
    save(Path(args.out), result, fig, started=started)
    return result


if __name__ == "__main__":
    main()
