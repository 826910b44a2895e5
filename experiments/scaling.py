"""How does held-out loss fall with model size at a fixed amount of data?

A mini scaling sweep: six LLaMA-style models from 32 to 256 wide (heads of 32, SwiGLU width 3x, 2 to 4
layers), each trained on the same tokens (same steps, batch and sequence length, seed and schedule). Plots
held-out loss against non-embedding parameters (Kaplan et al. 2020 count those) on log-log axes with a
least-squares power law L = a N^-alpha, and against training compute (6 N T).

    python experiments/scaling.py [--quick] [--steps 400]

Runs go under runs/gallery/scaling/ (not committed). Writes experiments/results/scaling.json and .png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import non_embedding_parameters, pyplot, save, train_variant, training_args  # noqa: E402

SIZES = [(32, 2), (64, 2), (96, 3), (128, 4), (192, 4), (256, 4)]  # (d_model, layers)
QUICK_SIZES = [(16, 1), (32, 1)]


def power_law(xs, ys) -> tuple[float, float]:
    """(a, alpha) of the least-squares line log y = log a - alpha log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return math.exp(my - slope * mx), -slope


def main(argv=None):
    args = training_args(__doc__, "scaling", steps=400, argv=argv, quick_help="two tiny models, a few steps")
    started = time.perf_counter()

    steps = 3 if args.quick else args.steps
    rows = []
    for width, layers in QUICK_SIZES if args.quick else SIZES:
        heads = max(1, width // 32) if not args.quick else 2
        shape = [f"model.d_model={width}", f"model.num_layers={layers}", f"model.num_heads={heads}"]
        shape += [f"model.num_kv_heads={heads}", f"model.mlp_dim={3 * width}"]
        trained = train_variant(Path(args.root) / f"d{width}_l{layers}", shape, steps=steps, quick=args.quick)
        cfg = trained.pop("config")
        m = cfg.model
        non_embedding = non_embedding_parameters(m)
        tokens = steps * cfg.train.batch_size * cfg.data.seq_len
        row = {"d_model": width, "layers": layers, "heads": heads, "non_embedding_parameters": non_embedding}
        row.update(train_tokens=tokens, train_flops=6 * non_embedding * tokens, **trained)
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("curve")}, flush=True)

    n = [r["non_embedding_parameters"] for r in rows]
    loss = [r["val_loss"] for r in rows]
    a, alpha = power_law(n, loss)
    best = min(rows, key=lambda r: r["val_loss"])
    summary = (
        f"{len(rows)} sizes from {n[0] / 1e3:,.0f}k to {n[-1] / 1e6:.2f}M non-embedding parameters on "
        f"{rows[0]['train_tokens'] / 1e6:.2f}M tokens: held-out loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
        f"power law fit alpha = {alpha:.3f}; lowest loss at {best['non_embedding_parameters'] / 1e6:.2f}M"
    )
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].loglog(n, loss, "o", label="trained")
    xs = [n[0] * (n[-1] / n[0]) ** (i / 20) for i in range(21)]
    axes[0].loglog(xs, [a * x**-alpha for x in xs], "--", color="gray", label=f"{a:.2f} N^-{alpha:.3f}")
    axes[0].set(title=f"fixed data ({rows[0]['train_tokens'] / 1e6:.2f}M tokens)", xlabel="non-embedding parameters")
    axes[0].set_ylabel("held-out loss")
    axes[0].legend(fontsize=8)
    for r in rows:
        steps_, losses = zip(*r["val_curve"])
        flops = [6 * r["non_embedding_parameters"] * s * r["train_tokens"] / steps for s in steps_]
        axes[1].loglog(flops, losses, "o-", ms=3, label=f"d{r['d_model']} L{r['layers']}")
    axes[1].set(title="held-out loss along training", xlabel="training FLOPs (6 N T)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    result = {"steps": steps, "rows": rows, "fit": {"a": a, "alpha": alpha}, "summary": summary}
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
