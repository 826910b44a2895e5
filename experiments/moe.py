"""Dense or mixture of experts? At equal active parameters, at equal total parameters, and how to balance it.

One model shape (the gallery's SMALL llama_tiny) trained with the same data, steps and seed:
- dense: a SwiGLU MLP of width F;
- MoE, equal active: 8 experts of width F/2, 2 a token (a token's MLP is F wide: the dense model's FLOPs,
  4x its MLP parameters), Switch balancing loss 0.01;
- dense, equal total: one SwiGLU MLP of width 4F (the MoE's MLP parameters, all active);
- MoE, loss-free balancing: the MoE with DeepSeek-V3's selection bias (router_balance, rate 1e-3) and no
  balancing loss;
- MoE, no balancing: neither.
Held-out loss against training tokens, training tokens/s, the busiest expert's load over the mean along
training (moe_imbalance), and each MoE's final expert loads on held-out text (every layer's, sorted).

    python experiments/moe.py [--quick] [--steps 400]

Runs go under runs/gallery/moe/ (not committed). Writes experiments/results/moe.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, save, train_variant, training_args  # noqa: E402

EXPERTS = ["model.num_experts=8", "model.experts_per_token=2"]


def variants(width: int) -> dict[str, list[str]]:
    moe = [*EXPERTS, f"model.expert_mlp_dim={width // 2}", f"model.mlp_dim={width}"]
    return {
        "dense": [f"model.mlp_dim={width}"],
        "MoE, equal active": [*moe, "model.aux_loss_weight=0.01"],
        "dense, equal total": [f"model.mlp_dim={4 * width}"],
        "MoE, loss-free balancing": [*moe, "model.router_balance=true", "model.router_balance_rate=0.001"],
        "MoE, no balancing": moe,
    }


def expert_loads(run: Path, texts: list[str]) -> list[float]:
    """Every layer's expert loads (fractions of its assignments, sorted, busiest first) on held-out text."""
    import jax.numpy as jnp

    from jaxlm.nn.moe import router_stats
    from jaxlm.train.run_dir import load_run

    cfg, tokenizer, model, _ = load_run(run)
    ids = [tokenizer.encode(t)[: cfg.data.seq_len] for t in texts]
    n = min(len(i) for i in ids)
    with router_stats() as found:
        model(jnp.asarray([i[:n] for i in ids]))
    load = np.asarray(found[0]["load"], np.float64)
    fractions = np.sort(load / load.sum(-1, keepdims=True), axis=-1)[:, ::-1]
    return [round(float(x), 4) for x in fractions.mean(0)]


def main(argv=None):
    args = training_args(__doc__, "moe", steps=400, argv=argv)
    started = time.perf_counter()

    from jaxlm.data.corpus import embedded_works
    from jaxlm.nn.models import active_params, count_params
    from jaxlm.train.trainer import read_metrics

    steps = 3 if args.quick else args.steps
    works = list(embedded_works().values())
    held_out = [works[-1][i * 2000 : i * 2000 + 1500] for i in range(8)]
    rows = []
    for name, overrides in variants(64 if args.quick else 384).items():
        run = Path(args.root) / name.replace(", ", "_").replace(" ", "_")
        trained = train_variant(run, overrides, steps=steps, quick=args.quick)
        cfg = trained.pop("config")
        tokens = cfg.train.batch_size * cfg.data.seq_len
        imbalance = [(r["step"], round(r["moe_imbalance"], 3)) for r in read_metrics(run) if "moe_imbalance" in r]
        row = {
            "variant": name,
            "parameters": count_params(cfg.model),
            "active_parameters": active_params(cfg.model),
            "router_parameters": cfg.model.num_layers * cfg.model.d_model * cfg.model.num_experts,
            "tokens_per_step": tokens,
            **trained,
            "imbalance_curve": imbalance,
            "expert_loads": expert_loads(run, held_out) if cfg.model.num_experts else None,
        }
        rows.append(row)
        print(
            f"{name}: {row['parameters']:,} parameters ({row['active_parameters']:,} active), held-out loss "
            f"{row['val_loss']:.3f}, {row['tokens_per_s']} tokens/s",
            flush=True,
        )
    by = {r["variant"]: r for r in rows}
    d, m, t = by["dense"], by["MoE, equal active"], by["dense, equal total"]
    free, none = by["MoE, loss-free balancing"], by["MoE, no balancing"]
    last = lambda r: r["imbalance_curve"][-1][1] if r["imbalance_curve"] else float("nan")  # noqa: E731
    summary = (
        f"held-out loss dense {d['val_loss']:.3f}, MoE at equal active parameters {m['val_loss']:.3f} "
        f"({m['val_loss'] - d['val_loss']:+.3f}, at {m['tokens_per_s'] / d['tokens_per_s']:.2f}x its tokens/s), "
        f"dense at equal total {t['val_loss']:.3f}; busiest expert at the end: {last(m):.2f}x the mean with the "
        f"balancing loss, {last(free):.2f}x loss-free, {last(none):.2f}x with neither"
    )
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in rows:
        steps_, losses = zip(*r["val_curve"]) if r["val_curve"] else ((), ())
        axes[0].plot([s * r["tokens_per_step"] / 1e6 for s in steps_], losses, marker="o", label=r["variant"])
        if r["imbalance_curve"]:
            s, v = zip(*r["imbalance_curve"])
            axes[1].plot(s, v, label=r["variant"])
    axes[0].set_xlabel("training tokens (M)")
    axes[0].set_ylabel("held-out loss")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("busiest expert / mean load")
    axes[1].legend(fontsize=7)
    moes = [r for r in rows if r["expert_loads"]]
    width = 0.8 / len(moes)
    for i, r in enumerate(moes):
        x = np.arange(len(r["expert_loads"])) + i * width
        axes[2].bar(x, r["expert_loads"], width, label=r["variant"])
    axes[2].axhline(1 / 8, color="gray", lw=0.8, ls="--")
    axes[2].set_xlabel("expert rank (busiest first), mean over layers")
    axes[2].set_ylabel("share of assignments (held out)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save(Path(args.out), {"steps": steps, "rows": rows, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
