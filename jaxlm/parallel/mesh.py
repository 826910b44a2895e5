"""Device mesh from the `mesh:` config section.

Axes, outermost to innermost: pipeline, data, fsdp, expert, tensor. Tensor parallelism
exchanges the most data per layer, so its ranks are neighbours in device order
(the same chip/host); pipeline stages talk least and span hosts.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxlm.config import MESH_AXES, Config, ConfigError, MeshConfig

log = logging.getLogger(__name__)


def make_mesh(mc: MeshConfig, devices=None) -> Mesh:
    """Mesh over `devices` (default: all devices of every process); ConfigError when it does not fit."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mc.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    used = math.prod(shape)
    if used < len(devices):
        if jax.process_count() > 1:
            raise ConfigError(
                f"mesh {sizes} uses {used} of {len(devices)} devices; a multi-process run must use them all"
            )
        log.warning("mesh %s uses %d of the %d devices", describe(sizes), used, len(devices))
        devices = devices[:used]
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)
    except Exception:  # make_mesh wants a device topology it understands; plain order is fine elsewhere
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def check_layout(cfg: Config, sizes: dict[str, int]) -> int:
    """Validates batch and layer splits for resolved mesh `sizes`; returns the pipeline micro-batch count."""
    tc, m = cfg.train, cfg.model
    replicas = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = tc.batch_size // tc.grad_accum
    stages = sizes["pipeline"]
    microbatches, repeats = cfg.mesh.microbatches or stages, cfg.mesh.pipeline_repeats
    experts = sizes["expert"]
    if experts > 1:
        if not m.num_experts:
            raise ConfigError(
                f"mesh.expert={experts} splits a mixture's experts: the model has none (model.num_experts)"
            )
        if m.num_experts % experts:
            raise ConfigError(f"model.num_experts ({m.num_experts}) must be divisible by mesh.expert ({experts})")
        if stages > 1:
            raise ConfigError("expert parallelism (mesh.expert > 1) does not run inside the pipeline: use one of them")
    if m.num_layers % stages:
        raise ConfigError(f"model.num_layers ({m.num_layers}) must be divisible by mesh.pipeline ({stages})")
    if repeats > 1:
        if stages == 1:
            raise ConfigError(f"mesh.pipeline_repeats={repeats} needs mesh.pipeline > 1")
        if m.num_layers % (stages * repeats):
            raise ConfigError(
                f"model.num_layers ({m.num_layers}) must be divisible by mesh.pipeline x mesh.pipeline_repeats "
                f"({stages} x {repeats})"
            )
        if microbatches % stages:
            raise ConfigError(
                f"the circular pipeline (mesh.pipeline_repeats={repeats}) feeds micro-batches in groups of "
                f"mesh.pipeline ({stages}): mesh.microbatches ({microbatches}) must be a multiple of it"
            )
    if stages > 1 and micro % microbatches:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {micro} rows must be divisible by mesh.microbatches "
            f"({microbatches})"
        )
    rows = micro // (microbatches if stages > 1 else 1)
    if rows % replicas:
        raise ConfigError(
            f"each micro-batch has {rows} rows, which do not split over data x fsdp x expert = {replicas} devices; "
            "make train.batch_size / (train.grad_accum x mesh.microbatches) a multiple of mesh.data x mesh.fsdp "
            "x mesh.expert"
        )
    if tc.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must split over {jax.process_count()} processes")
    return microbatches


def describe(sizes: dict[str, int]) -> str:
    parts = [f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1]
    return " x ".join(parts) or "1 device"
