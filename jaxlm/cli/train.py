"""`jaxlm train CONFIG [overrides]`: train or resume a run; with the multi-process flags, one process of many."""

from __future__ import annotations

import os
import sys

from jaxlm.cli.args import address, number


def add(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a model (resumes if the run directory has checkpoints)",
        description="Train the model of CONFIG on its data. Re-running the same command resumes from the "
        "latest checkpoint in train.run_dir; SIGTERM or Ctrl-C saves a checkpoint before exiting.",
        epilog="overrides are dotted key=value pairs, e.g. model.num_layers=2 train.steps=100 data.source=my.txt",
    )
    t.add_argument("config", help="YAML config, e.g. configs/llama_tiny.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument(
        "--stop-after", type=number(int, 1), default=None, metavar="STEP", help="stop (with a checkpoint) at this step"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = t.add_argument_group(
        "multi-process (multi-host)",
        "run the same command in every process; without these flags JAXLM_COORDINATOR, JAXLM_NUM_PROCESSES and "
        "JAXLM_PROCESS_ID are read when --distributed is given, else the cluster (SLURM, MPI, TPU) is detected",
    )
    d.add_argument("--distributed", action="store_true", help="join a multi-process run")
    d.add_argument(
        "--coordinator", type=address, metavar="HOST:PORT", help="address of process 0's coordination service"
    )
    d.add_argument("--num-processes", type=number(int, 1), help="number of processes in the run")
    d.add_argument("--process-id", type=number(int, 0), help="this process's index, 0 .. N-1")
    d.add_argument(
        "--heartbeat-timeout",
        type=number(int, 1),
        default=30,
        metavar="S",
        help="fail when a peer is silent this long (30)",
    )
    t.set_defaults(fn=run)


def run(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.train.trainer import train

    cfg = load_config(args.config, args.overrides)  # config errors before joining other processes
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        from jaxlm.parallel.distributed import initialize
        from jaxlm.parallel.supervise import run_supervised, supervised

        if not supervised():  # the work runs in a child, so a peer's death is reported in words
            env = lambda name: int(os.environ[name]) if os.environ.get(name, "").isdigit() else None  # noqa: E731
            pid = args.process_id if args.process_id is not None else env("JAXLM_PROCESS_ID")
            n = args.num_processes if args.num_processes is not None else env("JAXLM_NUM_PROCESSES")
            return run_supervised(args.argv, pid, n)

        initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)
    print(f"training {args.config} -> {cfg.train.run_dir}", file=sys.stderr)
    out = train(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    if out["interrupted"] is not None:
        print(
            f"stopped by signal {out['interrupted']} at step {out['step']}; checkpoint saved in "
            f"{cfg.train.run_dir}; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + int(out["interrupted"])
    line = f"step {out['step']} in {out['elapsed_s']:.0f} s"
    if "val_bpb" in out:
        line += f": val loss {out['val_loss']:.4f}, ppl {out['val_ppl']:.2f}, bits/byte {out['val_bpb']:.4f}"
    print(line)
    return 0
