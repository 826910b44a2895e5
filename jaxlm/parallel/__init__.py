"""Sharding over a device mesh: rules, mesh, pipeline schedule, sharded state, planning."""

from jaxlm.axes import RULES, activation_sharding, constrain, logical_to_spec, rules_for
from jaxlm.parallel.mesh import check_layout, make_mesh
from jaxlm.parallel.pipeline import pipeline

__all__ = [
    "RULES",
    "activation_sharding",
    "check_layout",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "pipeline",
    "rules_for",
]
