"""Pre-norm or post-norm? LayerNorm or RMSNorm? GELU MLP or SwiGLU?

One model shape (LLaMA-style: pre-norm, RMSNorm, SwiGLU) trained with the same data, steps and seed, changing
one thing at a time:
- post-norm (the original Transformer's placement) against pre-norm, with the default warmup and without
  any, at the default learning rate and at 3x it: loss curves, and whether training stalls or diverges;
- LayerNorm against RMSNorm: held-out loss, training tokens/s, and the normalisation alone (forward and
  backward of the op, jitted, on a (B, T, D) activation);
- a GELU MLP against SwiGLU at equal parameters (GELU's hidden width is 1.5x: two matrices instead of three).

    python experiments/norms_mlp.py [--quick] [--steps 400]

Runs go under runs/gallery/norms_mlp/ (not committed). Writes experiments/results/norms_mlp.json and .png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, save, train_variant, training_args  # noqa: E402


def variants(mlp: int) -> dict[str, list[str]]:
    """name -> overrides of the baseline (pre-norm, RMSNorm, SwiGLU of width mlp, warmup 50)."""
    return {
        "pre-norm": [f"model.mlp_dim={mlp}"],
        "post-norm": [f"model.mlp_dim={mlp}", "model.norm_position=post"],
        "pre-norm, no warmup": [f"model.mlp_dim={mlp}", "train.warmup_steps=0"],
        "post-norm, no warmup": [f"model.mlp_dim={mlp}", "model.norm_position=post", "train.warmup_steps=0"],
        "pre-norm, no warmup, 3x lr": [f"model.mlp_dim={mlp}", "train.warmup_steps=0", "train.lr=9e-3"],
        "post-norm, no warmup, 3x lr": [
            f"model.mlp_dim={mlp}",
            "model.norm_position=post",
            "train.warmup_steps=0",
            "train.lr=9e-3",
        ],
        "LayerNorm": [f"model.mlp_dim={mlp}", "model.norm=layernorm"],
        "GELU MLP": ["model.mlp=plain", "model.activation=gelu", f"model.mlp_dim={mlp * 3 // 2}"],
    }


def norm_op_time(name: str, shape, repeats: int) -> float:
    """Median seconds of one jitted forward + backward of the normalisation op on a float32 (B, T, D) array."""
    import jax
    import jax.numpy as jnp

    from jaxlm.ops.norms import layer_norm, rms_norm

    x = jax.random.normal(jax.random.key(0), shape)
    scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    op = (lambda x, s, b: rms_norm(x, s)) if name == "rmsnorm" else (lambda x, s, b: layer_norm(x, s, b))
    step = jax.jit(jax.grad(lambda x, s, b: jnp.sum(op(x, s, b) ** 2), argnums=(0, 1, 2)))
    jax.block_until_ready(step(x, scale, bias))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(step(x, scale, bias))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    args = training_args(__doc__, "norms_mlp", steps=400, argv=argv)
    started = time.perf_counter()

    from jaxlm.nn.models import count_params

    steps = 3 if args.quick else args.steps
    rows = []
    # SMALL's SwiGLU width: its 3 matrices of 384 columns hold as many parameters as GELU's 2 of 576
    for name, overrides in variants(64 if args.quick else 384).items():
        run = Path(args.root) / name.replace(", ", "_").replace(" ", "_")
        trained = train_variant(run, overrides, steps=steps, quick=args.quick)
        cfg = trained.pop("config")
        params = count_params(cfg.model)
        curve = trained["train_curve"]
        warm = cfg.train.warmup_steps
        row = {"variant": name, "overrides": overrides, "parameters": params, "lr": cfg.train.lr, "warmup": warm}
        tail = [x for _, x in curve[-max(1, len(curve) // 20) :]]  # the last 5% of steps: where training ended up
        row.update(trained, final_train_loss=round(sum(tail) / len(tail), 4))
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("curve")}, flush=True)

    shape = (4, 32, 64) if args.quick else (16, 128, 1024)
    op_s = {n: norm_op_time(n, shape, 5 if args.quick else 50) for n in ("layernorm", "rmsnorm")}
    by = {r["variant"]: r for r in rows}
    base = by["pre-norm"]
    pairs = [("", "with warmup"), (", no warmup", "without"), (", no warmup, 3x lr", "without at 3x lr")]
    placement = ", ".join(
        f"{by['pre-norm' + k]['val_loss']:.2f}/{by['post-norm' + k]['val_loss']:.2f} {label}" for k, label in pairs
    )
    summary = (
        f"held-out loss pre-/post-norm {placement}; LayerNorm {by['LayerNorm']['val_loss'] - base['val_loss']:+.3f} "
        f"vs RMSNorm at {by['LayerNorm']['tokens_per_s'] / base['tokens_per_s']:.2f}x its training speed, "
        f"the op alone {op_s['layernorm'] / op_s['rmsnorm']:.2f}x RMSNorm's time; GELU MLP "
        f"{by['GELU MLP']['val_loss'] - base['val_loss']:+.3f} vs SwiGLU at equal parameters"
    )
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    groups = [
        ("placement and warmup", [n for n in by if "norm," in n or n in ("pre-norm", "post-norm")]),
        ("norm and MLP", ["pre-norm", "LayerNorm", "GELU MLP"]),
    ]
    for ax, (title, names) in zip(axes, groups):
        for n in names:
            steps_, losses = zip(*by[n]["train_curve"])
            style = "--" if "post" in n else "-"
            ax.plot(steps_, losses, style, lw=1, label=n if n != "pre-norm" else "pre-norm, RMSNorm, SwiGLU")
        ax.set(title=title, xlabel="step", ylabel="training loss")
        lows = [min(x for _, x in by[n]["train_curve"] if math.isfinite(x)) for n in names]
        ax.set_ylim(min(lows) - 0.2, min(lows) + 3.0)
        ax.legend(fontsize=7)
    names = list(by)
    axes[2].barh(names, [by[n]["val_loss"] for n in names], color="tab:gray")
    axes[2].set_xlim(min(by[n]["val_loss"] for n in names) - 0.2, max(by[n]["val_loss"] for n in names) + 0.1)
    axes[2].set(title="held-out loss at the end", xlabel="loss")
    axes[2].tick_params(axis="y", labelsize=7)
    axes[2].invert_yaxis()
    fig.tight_layout()
    result = {"steps": steps, "rows": rows, "norm_op_shape": shape, "norm_op_seconds": op_s, "summary": summary}
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
