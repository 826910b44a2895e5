"""Joining a multi-process (multi-host) run with `jax.distributed`.

Each process runs the same `jaxlm train` command. The coordinator address,
process count and this process's id come from the arguments, else from
JAXLM_COORDINATOR / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID, else from the
cluster environment that `jax.distributed.initialize` detects itself (SLURM,
Open MPI, Cloud TPU, ...). On CPU, collectives go over gloo.

When a process dies, the coordination service stops hearing its heartbeats
and, after `heartbeat_timeout_s`, fails the survivors instead of letting them
wait in a collective forever.
"""

from __future__ import annotations

import logging
import os

import jax

from jaxlm.config import ConfigError

log = logging.getLogger(__name__)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 30,
    init_timeout_s: int = 120,
) -> None:
    """Connects this process to the others; call before any other JAX call."""
    env = os.environ
    coordinator = coordinator or env.get("JAXLM_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("JAXLM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXLM_PROCESS_ID")
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError(
            "a multi-process run needs the coordinator address, the number of processes and this process's id "
            "together (--coordinator/--num-processes/--process-id or JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/"
            "JAXLM_PROCESS_ID)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    log.info(
        "process %d of %d: %d local devices, %d in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
