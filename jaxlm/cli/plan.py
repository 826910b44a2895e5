"""`jaxlm plan CONFIG`: the sharding of every parameter and the memory per device, without allocating."""

from __future__ import annotations

from jaxlm.cli.args import number


def add(sub) -> None:
    pl = sub.add_parser(
        "plan",
        help="print how a config's training shards over the mesh, and memory per device",
        description="Without allocating anything: the sharding of every parameter and the per-device bytes of "
        "parameters, gradients, optimizer state and (estimated) activations.",
    )
    pl.add_argument("config", help="YAML config")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. mesh.fsdp=8)")
    pl.add_argument(
        "--devices", type=number(int, 1), default=None, help="plan for this many devices (default: those present)"
    )
    pl.add_argument(
        "--compiled",
        action="store_true",
        help="also compile the train step on the devices present and compare with XLA's memory analysis",
    )
    pl.set_defaults(fn=run)


def run(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.plan import plan

    print(plan(load_config(args.config, args.overrides), args.devices, compiled=args.compiled))
    return 0
