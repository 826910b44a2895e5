"""Multi-head latent attention's KV cache against grouped-query and multi-head attention, in one run.

1. Cache bytes per token (all layers, bfloat16) of the `deepseek_v3` preset's attention as it is (MLA: the
   512-value latent and the 64-value RoPE key a layer), and of the same model with grouped-query attention
   (8 K/V heads of 128) and multi-head attention (128 heads of 128), from the shapes `init_cache` allocates
   (`jax.eval_shape`: nothing is allocated).
2. On this machine, a small model (d_model 512, 8 layers, 8 heads) decoding one token a step for a batch of 4
   after a --context token prompt: step time and cache bytes, MLA (rank 128 + 32) against GQA (2 K/V heads of
   64) and MHA. MLA expands the cached latents into keys and values every step (the non-absorbed form): it
   trades cache bytes for that work.

    python experiments/bench_mla.py [--context 2048] [--steps 16]

Writes experiments/results/bench_mla.json and .png.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, pyplot, save  # noqa: E402

from jaxlm.config import ModelConfig  # noqa: E402
from jaxlm.config.model import PRESETS  # noqa: E402
from jaxlm.nn.models import build_model  # noqa: E402


def cache_bytes_per_token(cfg: ModelConfig, slots: int = 64) -> float:
    """Bytes of K/V cache a token takes (every layer), from the shapes of an abstract cache of `slots` slots."""
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, slots))
    return sum(np.prod(cache[n].shape) * cache[n].dtype.itemsize for n in ("k", "v")) / slots


def variants(base: ModelConfig, *, gqa_heads: int) -> dict[str, ModelConfig]:
    mha = dict(kv_lora_rank=0, q_lora_rank=0, qk_rope_head_dim=0, qk_nope_head_dim=0, v_head_dim=0)
    head = base.mla_nope_dim
    return {
        "MLA": base,
        f"GQA ({gqa_heads} kv)": dataclasses.replace(base, **mha, num_kv_heads=gqa_heads, head_dim=head),
        "MHA": dataclasses.replace(base, **mha, num_kv_heads=0, head_dim=head),
    }


def decode_time(cfg: ModelConfig, context: int, steps: int, batch: int = 4) -> float:
    """Seconds a decode step of `batch` rows after a `context`-token prompt (best of the steps)."""
    model = build_model(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, tokens, index):
        logits, cache = nnx.merge(graphdef, state).decode(
            tokens, jnp.full(tokens.shape, index), cache=cache, cache_index=index
        )
        return logits, cache

    cache = model.init_cache(batch, context + steps + 1)
    prompt = jax.random.randint(jax.random.PRNGKey(0), (batch, context), 0, cfg.vocab_size)
    _, cache = jax.jit(lambda s, c, t: nnx.merge(graphdef, s).decode(t, cache=c, cache_index=0))(state, cache, prompt)
    tokens = prompt[:, -1:]
    times = []
    for i in range(steps):
        t = time.perf_counter()
        logits, cache = step(state, cache, tokens, context + i)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "bench_mla"))
    a = p.parse_args(argv)
    started = time.perf_counter()
    preset = {name: cache_bytes_per_token(c) for name, c in variants(PRESETS["deepseek_v3"], gqa_heads=8).items()}
    for name, b in preset.items():
        print(f"deepseek_v3 attention as {name:>12}: {b / 1024:8.1f} KiB a token ({b / preset['MLA']:.1f}x MLA)")
    small = ModelConfig(
        vocab_size=1024,
        d_model=512,
        num_layers=8,
        num_heads=8,
        mlp_dim=1024,
        max_seq_len=a.context + a.steps + 8,
        kv_lora_rank=128,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
    )
    measured = {}
    for name, cfg in variants(small, gqa_heads=2).items():
        s = decode_time(cfg, a.context, a.steps)
        measured[name] = {"step_ms": round(s * 1e3, 2), "cache_bytes_per_token": cache_bytes_per_token(cfg)}
        print(
            f"small model, {name:>12}: decode step {s * 1e3:7.2f} ms at context {a.context}, "
            f"cache {measured[name]['cache_bytes_per_token'] / 1024:.2f} KiB a token",
            flush=True,
        )
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3))
    names = list(preset)
    axes[0].bar(names, [preset[n] / 1024 for n in names], color=["C0", "C1", "C2"])
    axes[0].set_ylabel("KiB a token (61 layers, bf16)")
    axes[0].set_title("deepseek_v3 KV cache", fontsize=9)
    small_names = list(measured)
    axes[1].bar(small_names, [measured[n]["step_ms"] for n in small_names], color=["C0", "C1", "C2"])
    axes[1].set_ylabel("ms a decode step (batch 4)")
    axes[1].set_title(f"small model, context {a.context}, CPU", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save(Path(a.out), {"deepseek_v3_cache_bytes_per_token": preset, "small_model": measured}, fig, started=started)


if __name__ == "__main__":
    main()
