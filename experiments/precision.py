"""Does bfloat16 training match float32? Does float16 with loss scaling?

One model shape trained three ways with the same data, steps and seed: float32; bfloat16 compute with
float32 master weights and optimizer state; float16 compute with float32 master weights and dynamic loss
scaling (`train.precision`). Reports loss curves, the held-out loss, training tokens/s, and for float16 the
loss scale and the steps it skipped.

    python experiments/precision.py [--quick] [--steps 400]

Runs go under runs/gallery/precision/ (not committed). Writes experiments/results/precision.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, save, train_variant, training_args  # noqa: E402

PRECISIONS = ["fp32", "bf16", "fp16"]


def main(argv=None):
    args = training_args(__doc__, "precision", steps=400, argv=argv)
    started = time.perf_counter()

    import jax

    from jaxlm.train.trainer import read_metrics

    steps = 3 if args.quick else args.steps
    rows = []
    for precision in PRECISIONS:
        run = Path(args.root) / precision
        trained = train_variant(run, [f"train.precision={precision}"], steps=steps, quick=args.quick)
        trained.pop("config")
        row = {"precision": precision, **trained}
        if precision == "fp16":
            logged = [r for r in read_metrics(run) if "loss_scale" in r]
            row["loss_scale_curve"] = [(r["step"], r["loss_scale"]) for r in logged]
            row["skipped_steps"] = logged[-1]["skipped"] if logged else 0
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("curve")}, flush=True)

    by = {r["precision"]: r for r in rows}
    ref = by["fp32"]
    summary = "; ".join(
        f"{r['precision']}: held-out loss {r['val_loss']:.3f} ({r['val_loss'] - ref['val_loss']:+.3f} vs fp32) "
        f"at {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x its tokens/s"
        + (f", {r['skipped_steps']} steps skipped by loss scaling" if "skipped_steps" in r else "")
        for r in rows
    )
    summary += f" (on {jax.devices()[0].platform.upper()})"
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for r in rows:
        axes[0].plot(*zip(*r["train_curve"]), lw=1, label=r["precision"])
    lows = [min(x for _, x in r["train_curve"]) for r in rows]
    axes[0].set_ylim(min(lows) - 0.2, min(lows) + 3.0)
    axes[0].set(title="training loss", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(*zip(*by["fp16"]["loss_scale_curve"]), color="tab:green")
    axes[1].set(title=f"fp16 loss scale ({by['fp16']['skipped_steps']} steps skipped)", xlabel="step", yscale="log")
    names = [r["precision"] for r in rows]
    axes[2].bar(names, [r["tokens_per_s"] for r in rows], color="tab:gray")
    axes[2].set(title=f"training speed ({jax.devices()[0].platform.upper()})", ylabel="tokens/s")
    fig.tight_layout()
    save(Path(args.out), {"steps": steps, "rows": rows, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
