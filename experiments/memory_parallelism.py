"""Do ZeRO stages, tensor and pipeline parallelism divide memory as they claim? Per-device bytes of the
training state measured from the real shards on 8 emulated CPU devices, against `jaxlm plan`'s estimate.

For each mesh layout the train state of the config is created sharded (`ShardedTraining.init_state`, as
training does) and the bytes of its parameters and AdamW state held by device 0 are summed from the
arrays' shards. `jaxlm plan`'s estimate of the same (`jaxlm.plan.memory_per_device`) is printed beside
them. Gradients exist only inside the compiled step, so only the estimate shows them.

    python experiments/memory_parallelism.py [--quick] [config] [overrides]

Writes experiments/results/memory_parallelism.json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, host_devices, pyplot, save  # noqa: E402

host_devices(8)  # before JAX is imported
import jax  # noqa: E402

LAYOUTS = {
    "data=8 (ZeRO-0)": ["mesh.data=8", "mesh.zero_stage=0"],
    "fsdp=8 ZeRO-1": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1"],
    "fsdp=8 ZeRO-2": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=2"],
    "fsdp=8 ZeRO-3": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3"],
    "data=2 tensor=4": ["mesh.data=2", "mesh.tensor=4"],
    "pipeline=4 data=2": ["mesh.data=2", "mesh.pipeline=4", "mesh.microbatches=4"],
    "pipeline=2 tensor=2 fsdp=2": [
        "mesh.data=1",
        "mesh.pipeline=2",
        "mesh.tensor=2",
        "mesh.fsdp=2",
        "mesh.microbatches=2",
    ],
}
QUICK = ["model.d_model=32", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4", "model.mlp_dim=64"]
QUICK += ["model.vocab_size=256", "data.tokenizer=byte", "train.batch_size=8"]


def device0_bytes(tree) -> int:
    """Bytes of `tree`'s arrays held by the first device."""
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/llama_tiny.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--quick", action="store_true", help="a tiny model and three layouts: seconds")
    p.add_argument("--out", default=str(RESULTS / "memory_parallelism"))
    args = p.parse_args(argv)
    started = time.perf_counter()

    from jaxlm.config import load_config
    from jaxlm.plan import memory_per_device
    from jaxlm.train.sharded import ShardedTraining

    layouts = dict(list(LAYOUTS.items())[:4:1]) if args.quick else LAYOUTS
    if args.quick:
        layouts = {k: LAYOUTS[k] for k in ("data=8 (ZeRO-0)", "fsdp=8 ZeRO-3", "data=2 tensor=4")}
    rows = []
    for name, overrides in layouts.items():
        cfg = load_config(args.config, [*args.overrides, *(QUICK if args.quick else []), *overrides])
        state = ShardedTraining(cfg).init_state()
        measured = {"params": device0_bytes(state.params), "opt_state": device0_bytes(state.opt_state)}
        estimate = memory_per_device(cfg, len(jax.devices()))
        rows.append(
            {
                "layout": name,
                "overrides": overrides,
                "measured_params_bytes": measured["params"],
                "measured_opt_state_bytes": measured["opt_state"],
                "plan_params_bytes": round(estimate["params"]),
                "plan_opt_state_bytes": round(estimate["opt_state"]),
                "plan_grads_bytes": round(estimate["grads"]),
                "plan_activations_bytes": round(estimate["activations"]),
            }
        )
        print(rows[-1], flush=True)
        del state
    base = rows[0]
    lines = []
    for r in rows:
        ratio = (base["measured_params_bytes"] + base["measured_opt_state_bytes"]) / (
            r["measured_params_bytes"] + r["measured_opt_state_bytes"]
        )
        r["state_vs_replicated"] = round(1 / ratio, 3)
        off = max(
            abs(r["measured_params_bytes"] - r["plan_params_bytes"]) / max(1, r["plan_params_bytes"]),
            abs(r["measured_opt_state_bytes"] - r["plan_opt_state_bytes"]) / max(1, r["plan_opt_state_bytes"]),
        )
        r["plan_relative_error"] = round(off, 4)
        lines.append(f"{r['layout']}: {1 / ratio:.2f} of the replicated state per device (plan within {off:.1%})")
    summary = "; ".join(lines)
    print(summary)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["layout"] for r in rows]
    xs = range(len(rows))
    mib = 1 / 2**20
    pb = [r["measured_params_bytes"] * mib for r in rows]
    ob = [r["measured_opt_state_bytes"] * mib for r in rows]
    ax.bar(xs, pb, 0.6, label="parameters (measured)")
    ax.bar(xs, ob, 0.6, bottom=pb, label="AdamW state (measured)")
    ax.scatter(xs, [(r["plan_params_bytes"] + r["plan_opt_state_bytes"]) * mib for r in rows], marker="_", s=600,
               color="black", zorder=3, label="jaxlm plan: parameters + AdamW state")  # fmt: skip
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MiB on device 0 of 8")
    ax.set_title("training state per device by layout", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(Path(args.out), {"config": args.config, "devices": len(jax.devices()), "rows": rows, "summary": summary}, fig,
         started=started)  # fmt: skip


if __name__ == "__main__":
    main()
