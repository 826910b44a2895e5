"""How long a sequence can one device train on, and what does a longer context buy a small model?

1. Memory and speed against T. The llama_tiny shape (d_model 256, 4 layers, 8 heads / 2 kv, vocabulary
   2048), batch 1, trained at T = 1k ... 32k four ways: the reference attention or blockwise attention
   (`model.attention_impl=blockwise`), each with the whole read-out or the chunked one
   (`model.logits_chunk=512`). For each, the compiled train step's peak memory (XLA's memory analysis, nothing
   allocated) and, where the peak fits in --time-budget, the measured time of a step.
2. The longest T whose train step fits in --budget (doubling T until it does not; compiled only).
3. Context parallelism: the same train step on 4 emulated devices with mesh.context=4 against one device:
   per-device peak memory and the loss of one step (equal by construction).
4. A long-context fine-tune: runs/llama_tiny (pretrained at 128 tokens, max_seq_len 256) extended with YaRN
   (factor 16: 256 -> 4096) and fine-tuned at 4096 tokens (blockwise, chunked read-out); held-out perplexity
   at 256 and 4096 tokens before (unscaled and YaRN-scaled) and after.

    python experiments/long_context.py [--quick] [--steps 60]

Runs go under runs/gallery/long_context/ (not committed). Writes experiments/results/long_context.json and .png.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, host_devices, pyplot, quick_corpus, save  # noqa: E402

host_devices(4)  # before JAX is imported (part 3)

VARIANTS = {
    "reference": [],
    "reference + chunked loss": ["model.logits_chunk=512"],
    "blockwise": ["model.attention_impl=blockwise"],
    "blockwise + chunked loss": ["model.attention_impl=blockwise", "model.logits_chunk=512"],
}
GiB = 1024**3


def step_config(T: int, variant: list[str], quick: bool, extra=()):
    from jaxlm.config import load_config

    shape = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2"] if quick else []
    shape += ["model.vocab_size=512", "model.mlp_dim=64", "data.tokenizer=byte"] if quick else []
    block = ["model.attention_block=64"] if quick else []
    base = [f"data.seq_len={T}", f"model.max_seq_len={T}", "train.batch_size=1", "mesh.data=1", *shape, *block]
    return load_config("configs/llama_tiny.yaml", [*base, *variant, *extra])


def measure_step(cfg, repeats: int = 3) -> tuple[float, float]:
    """(median seconds of a train step after the first, loss of the first) on random tokens."""
    import jax

    from jaxlm.train.sharded import ShardedTraining

    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
    batch = sharded.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state, metrics = sharded.train_step(state, batch)
    first = float(metrics["loss"])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, metrics = sharded.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return float(np.median(times)), first


def perplexity(model, tokens, length: int) -> float:
    """exp(mean next-token loss) over `tokens` cut into rows of `length`, one row at a time."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.ops.losses import masked_sum, token_nll

    @nnx.jit
    def loss(model, inputs, targets):
        x, _ = model.hidden(inputs)
        return masked_sum(model.readout(token_nll, x, targets), None)

    rows = (len(tokens) - 1) // length
    total, count = 0.0, 0.0
    for i in range(rows):
        piece = np.asarray(tokens[i * length : (i + 1) * length + 1])[None]
        s, n = loss(model, jnp.asarray(piece[:, :-1]), jnp.asarray(piece[:, 1:]))
        total, count = total + float(s), count + float(n)
    return float(np.exp(total / count))


def with_model_config(model, **changes):
    """The same parameters under a model config with `changes` (RoPE scaling and attention are computed, not
    stored)."""
    import dataclasses

    from flax import nnx

    from jaxlm.nn.models import build_model

    cfg = dataclasses.replace(model.cfg, **changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    return nnx.merge(graphdef, nnx.state(model, nnx.Param))


def memory_and_speed(args, lengths, time_budget):
    from jaxlm.plan import compiled_memory

    rows = []
    for name, variant in VARIANTS.items():
        for T in lengths:
            cfg = step_config(T, variant, args.quick)
            peak = compiled_memory(cfg)["peak"]
            row = {"variant": name, "T": T, "peak_bytes": peak, "step_s": None}
            if peak < time_budget and T <= lengths[-2 if len(lengths) > 2 else -1]:
                row["step_s"], row["loss"] = measure_step(cfg)
                row["tokens_per_s"] = round(T / row["step_s"], 1)
            rows.append(row)
            step = f"{row['step_s']:.2f} s a step" if row["step_s"] else "not run"
            print(f"{name:26s} T={T:6d} peak {peak / GiB:7.2f} GiB  {step}", flush=True)
    return rows


def longest(args, start: int, budget: float, limit: int) -> dict:
    """The longest power-of-two T from `start` whose compiled train step fits `budget`, per variant."""
    from jaxlm.plan import compiled_memory

    fits = {}
    for name, variant in VARIANTS.items():
        T, best = start, None
        while T <= limit:
            if compiled_memory(step_config(T, variant, args.quick))["peak"] > budget:
                break
            best, T = T, 2 * T
        fits[name] = best
        print(f"{name:26s} fits up to T={best} in {budget / GiB:.1f} GiB", flush=True)
    return fits


def context_parallel(args, T: int) -> dict:
    from jaxlm.plan import compiled_memory

    fast = VARIANTS["blockwise + chunked loss"]
    out = {"T": T}
    for C in (1, 4):
        cfg = step_config(T, fast, args.quick, [f"mesh.context={C}"])
        out[f"context={C}"] = {"peak_bytes": compiled_memory(cfg)["peak"]}
        out[f"context={C}"]["step_s"], out[f"context={C}"]["loss"] = measure_step(cfg, repeats=1)
        print(f"context={C} T={T}: {out[f'context={C}']}", flush=True)
    return out


def extend_context(args, root: Path) -> dict:
    """Fine-tunes runs/llama_tiny (or a quick base) with YaRN to 16x its context; perplexity before and after."""
    from jaxlm.config import load_config
    from jaxlm.data.corpus import load_corpus
    from jaxlm.data.loader import pack_documents
    from jaxlm.train.run_dir import load_run
    from jaxlm.train.trainer import train

    base = Path(args.base)
    quick = ["data.seq_len=32", "model.max_seq_len=64", "train.steps=10", "data.tokenizer=byte"] if args.quick else []
    quick += ["model.d_model=32", "model.num_layers=1", "model.vocab_size=257"] if args.quick else []
    quick += [f"data.source={quick_corpus(root)}"] if args.quick else []
    if not (base / "config.yaml").exists() or args.quick:
        print(f"pretraining the base {base}", flush=True)
        train(load_config("configs/llama_tiny.yaml", [f"train.run_dir={base}", "mesh.data=1", *quick]), progress=False)
    cfg, tokenizer, model, _ = load_run(base)
    short = cfg.model.max_seq_len
    factor = 16
    long = short * factor
    yarn = dict(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_len=short, max_seq_len=long)
    fast = dict(attention_impl="blockwise", logits_chunk=min(512, long), attention_block=min(512, long))
    _, val = load_corpus(cfg.data.source, cfg.data.val_fraction)
    tokens = pack_documents(tokenizer.encode_batch(val), tokenizer.eos_id)[: long * (2 if args.quick else 6) + 1]
    lengths = [short, long]
    measure = lambda m: {n: round(perplexity(m, tokens, n), 3) for n in lengths}  # noqa: E731
    before = measure(with_model_config(model, max_seq_len=long, **fast))
    scaled = measure(with_model_config(model, **yarn, **fast))
    print("before", before, "YaRN untrained", scaled, flush=True)
    run = root / "yarn"
    overrides = [f"finetune.init_from={base}", f"train.run_dir={run}", "mesh.data=1", f"data.seq_len={long}"]
    overrides += [f"model.{k}={v}" for k, v in {**yarn, **fast}.items()]
    overrides += [f"train.steps={args.steps}", "train.batch_size=2", "train.lr=3e-4", "train.warmup_steps=5"]
    overrides += [f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", "train.eval_batches=2"]
    overrides += [f"data.source={cfg.data.source}"]
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    train(load_config(None, overrides), progress=False)
    wall = time.perf_counter() - started
    _, _, tuned, _ = load_run(run)
    after = measure(tuned)
    print("after", after, flush=True)
    return {"short": short, "long": long, "before": before, "yarn_untrained": scaled, "after": after,
            "steps": args.steps, "finetune_wall_s": round(wall, 1)}  # fmt: skip


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model and short sequences: about a minute")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps at the long context")
    p.add_argument("--root", default="runs/gallery/long_context")
    p.add_argument("--base", default="runs/llama_tiny", help="the pretrained run to extend")
    p.add_argument("--budget", type=float, default=4.0, help="GiB a train step may take (part 2)")
    p.add_argument("--time-budget", type=float, default=6.0, help="GiB under which a step is timed (part 1)")
    p.add_argument("--out", default=str(RESULTS / "long_context"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    logging.getLogger("jaxlm.parallel.mesh").setLevel(logging.ERROR)  # one device of the four, on purpose
    root = Path(args.root)
    if args.quick:
        args.steps, args.base = 3, str(root / "base")
        lengths, budget, start, limit, cp_T = [256, 512], 0.02 * GiB, 256, 1024, 256
    else:
        lengths, budget, start, limit, cp_T = (
            [1024, 2048, 4096, 8192, 16384, 32768],
            args.budget * GiB,
            1024,
            131072,
            8192,
        )
    rows = memory_and_speed(args, lengths, args.time_budget * GiB)
    fits = longest(args, start, budget, limit)
    cp = context_parallel(args, cp_T)
    finetune = extend_context(args, root)

    by = lambda name, key: [r[key] for r in rows if r["variant"] == name]  # noqa: E731
    T_hi = lengths[-1]
    peak = {n: dict(zip(by(n, "T"), by(n, "peak_bytes"))) for n in VARIANTS}
    ratio = peak["reference"][T_hi] / peak["blockwise + chunked loss"][T_hi]
    speed = {n: dict(zip(by(n, "T"), by(n, "step_s"))) for n in VARIANTS}
    rel = speed["reference"].get(lengths[0]) / speed["blockwise"].get(lengths[0])
    c1, c4 = cp["context=1"], cp["context=4"]
    summary = (
        f"peak train-step memory at T={T_hi}: reference {peak['reference'][T_hi] / GiB:.2f} GiB, blockwise + chunked "
        f"loss {peak['blockwise + chunked loss'][T_hi] / GiB:.3f} GiB ({ratio:.0f}x less); blockwise "
        f"{rel:.2f}x the reference's speed at T={lengths[0]}; longest T in {budget / GiB:.2g} GiB: "
        + ", ".join(f"{n} {fits[n]}" for n in VARIANTS)
        + f"; context=4 per-device peak {c4['peak_bytes'] / c1['peak_bytes']:.2f}x one device's at T={cp_T}; "
        f"YaRN {finetune['short']}->{finetune['long']} perplexity at {finetune['long']}: "
        f"{finetune['before'][finetune['long']]:.1f} unscaled, {finetune['yarn_untrained'][finetune['long']]:.1f} "
        f"scaled, {finetune['after'][finetune['long']]:.1f} after {finetune['steps']} steps"
    )
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, name in enumerate(VARIANTS):
        axes[0].plot(by(name, "T"), [b / GiB for b in by(name, "peak_bytes")], "o-", color=f"C{i}", label=name)
        timed = [(t, s) for t, s in zip(by(name, "T"), by(name, "step_s")) if s]
        if timed:
            axes[1].plot(*zip(*timed), "o-", color=f"C{i}", label=name)
    axes[0].axhline(budget / GiB, color="gray", ls=":", lw=0.8)
    axes[0].set(title="compiled train-step peak (batch 1)", ylabel="GiB", yscale="log")
    axes[1].set(title="train step time", ylabel="seconds", yscale="log")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.legend(fontsize=7)
    labels = [f"{finetune['short']} tokens", f"{finetune['long']} tokens"]
    x = np.arange(2)
    for i, (key, label) in enumerate(
        [("before", "base"), ("yarn_untrained", "base + YaRN"), ("after", "YaRN fine-tuned")]
    ):
        vals = [finetune[key][finetune["short"]], finetune[key][finetune["long"]]]
        axes[2].bar(x + (i - 1) * 0.27, vals, 0.27, label=label)
    axes[2].set_xticks(x, labels)
    axes[2].set(title="held-out perplexity", yscale="log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    result = {"rows": rows, "longest": fits, "budget_bytes": budget, "context_parallel": cp, "yarn": finetune}
    save(Path(args.out), {**result, "steps": args.steps, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
