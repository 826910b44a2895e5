"""Training throughput of one config under each mesh layout of the sharding issue.

On a CPU the 8 "devices" are host threads sharing the same cores
(`--xla_force_host_platform_device_count`), so these figures show that every
layout compiles and runs, and what its communication costs relative to plain
data parallelism here; they say nothing about accelerator scaling.

    python experiments/bench_parallel.py configs/llama_tiny.yaml [overrides] [--steps 5] [--cpu-devices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8 zero1": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=1"],
    "fsdp=8 zero2": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=2"],
    "fsdp=8 zero3": ["mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3"],
    "data=2 tensor=4": ["mesh.data=2", "mesh.tensor=4"],
    "fsdp=2 tensor=2 data=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "pipeline=2 data=4": ["mesh.data=4", "mesh.pipeline=2", "mesh.microbatches=4"],
    "pipeline=4 tensor=2": ["mesh.data=1", "mesh.pipeline=4", "mesh.tensor=2", "mesh.microbatches=8"],
    # The circular schedule: same devices and micro-batches, a smaller bubble.
    "pipeline=2 data=4 circular": ["mesh.data=4", "mesh.pipeline=2", "mesh.microbatches=4", "mesh.pipeline_repeats=2"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=8, help="host devices to emulate when running on CPU")
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS), help=f"subset of {list(LAYOUTS)}")
    args = p.parse_args()
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):  # must precede the first JAX import
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
    sys.path.insert(0, os.path.dirname(__file__))
    import jax
    from bench_train import measure

    from jaxlm.config import load_config

    print(f"{jax.device_count()} x {jax.devices()[0].platform}:{jax.devices()[0].device_kind}")
    rows = []
    for name in args.layouts:
        cfg = load_config(args.config, [*args.overrides, *LAYOUTS[name]])
        r = {"layout": name, **measure(cfg, args.steps)}
        rows.append(r)
        base = rows[0]["tokens_per_s"]
        print(
            f"{name:<24} {r['tokens_per_s']:>9,} tok/s  {r['step_ms']:>8.1f} ms/step  compile {r['compile_s']:>5.1f} s"
            f"  x{r['tokens_per_s'] / base:.2f} vs {rows[0]['layout']}",
            flush=True,
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
