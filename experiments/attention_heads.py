"""Does grouped-query attention keep multi-head attention's quality with a fraction of the KV cache?

Trains the default model shape three ways at (nearly) the same parameter count — MHA (8 key/value heads),
GQA (2) and MQA (1) — the MLP width absorbing the difference in K/V projection parameters, with the same
data, steps and seed; then reports for each the held-out loss, the KV-cache bytes per token, and greedy
decode tokens/s at batch 1 and 16 (same prompts, compilation excluded).

    python experiments/attention_heads.py [--quick] [--steps 200]

Runs go under runs/gallery/attention_heads/ (not committed). Writes experiments/results/attention_heads.json
and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, save, train_variant, training_args  # noqa: E402

# kv heads -> MLP width that keeps the parameter count of the default (8 heads of 32, d_model 256,
# 2 kv heads, mlp 704): each kv head adds 2 x 256 x 32 parameters per layer, each MLP unit 3 x 256.
VARIANTS = {"MHA": (8, 576), "GQA": (2, 704), "MQA": (1, 725)}


def decode_rate(model, batch: int, new: int) -> float:
    from jaxlm.generate import Generator

    gen = Generator(model)
    prompts = [[(7 * i + 3 * b) % 200 + 1 for i in range(16)] for b in range(batch)]
    gen.generate(prompts, max_new_tokens=4, temperature=0.0)  # compile
    t = time.perf_counter()
    gen.generate(prompts, max_new_tokens=new, temperature=0.0)
    return batch * new / (time.perf_counter() - t)


def main(argv=None):
    args = training_args(__doc__, "attention_heads", steps=200, argv=argv)
    started = time.perf_counter()

    from jaxlm.nn.models import count_params
    from jaxlm.train.run_dir import load_run

    steps = 2 if args.quick else args.steps
    new = 16 if args.quick else 128
    rows = []
    for name, (kv, mlp) in VARIANTS.items():
        run = Path(args.root) / name
        overrides = [f"model.num_kv_heads={kv}", f"model.mlp_dim={mlp // 8 if args.quick else mlp}"]
        trained = train_variant(run, overrides, steps=steps, quick=args.quick, small=False)
        cfg, _, model, _ = load_run(run)
        m = cfg.model
        params = count_params(m)
        kv_bytes = 2 * m.num_layers * m.kv_heads * m.dim_per_head * 4  # K and V, float32, per token
        rows.append(
            {
                "variant": name,
                "kv_heads": m.kv_heads,
                "mlp_dim": m.mlp_dim,
                "parameters": params,
                "val_loss": trained["val_loss"],
                "val_curve": trained["val_curve"],
                "kv_cache_bytes_per_token": kv_bytes,
                "decode_tokens_per_s_batch1": round(decode_rate(model, 1, new), 1),
                "decode_tokens_per_s_batch16": round(decode_rate(model, 16, new), 1),
                "train_wall_s": trained["train_wall_s"],
            }
        )
        print(rows[-1], flush=True)
    mha = rows[0]
    parts = [
        f"{r['variant']} ({r['kv_heads']} kv heads): val loss {r['val_loss']:.3f} "
        f"({r['val_loss'] - mha['val_loss']:+.3f} vs MHA), KV cache {r['kv_cache_bytes_per_token'] / mha['kv_cache_bytes_per_token']:.2f} "
        f"of MHA's, decode at batch 16 {r['decode_tokens_per_s_batch16'] / mha['decode_tokens_per_s_batch16']:.2f}x MHA's"
        for r in rows
    ]
    summary = "; ".join(parts)
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for r in rows:
        axes[0].plot(*zip(*r["val_curve"]), "o-", label=r["variant"])
    axes[0].set(xlabel="step", ylabel="held-out loss", title="quality")
    axes[0].legend(fontsize=8)
    names = [r["variant"] for r in rows]
    axes[1].bar(names, [r["kv_cache_bytes_per_token"] / 1024 for r in rows], color="tab:gray")
    axes[1].set(ylabel="KiB per token", title="KV cache")
    x = range(len(rows))
    axes[2].bar([i - 0.2 for i in x], [r["decode_tokens_per_s_batch1"] for r in rows], 0.4, label="batch 1")
    axes[2].bar([i + 0.2 for i in x], [r["decode_tokens_per_s_batch16"] for r in rows], 0.4, label="batch 16")
    axes[2].set_xticks(list(x), names)
    axes[2].set(ylabel="decode tokens/s", title="speed")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save(Path(args.out), {"steps": steps, "rows": rows, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
