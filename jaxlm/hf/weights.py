"""Hugging Face tensors <-> jaxlm parameters, through the family's layout table.

A table entry is (HF name, jaxlm path or list of paths (fused tensors), layout); layer stacks are
(HF name prefix with {} for the layer, jaxlm stack path, per-layer table, layers[, the HF number of the stack's
first layer]): jaxlm stacks layers along a
leading `layers` axis, Hugging Face numbers them. A per-layer name with `{e}` is one tensor an expert, which
jaxlm stacks along the `experts` axis after `layers`.
"""

from __future__ import annotations

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import to_hf, to_jax
from jaxlm.hf.families import layout as family_layout

# Buffers some checkpoints carry that hold no parameters.
_BUFFERS = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")


def _paths(root: tuple, target) -> list[tuple]:
    return [root + p for p in target] if isinstance(target, list) else [root + target]


def hf_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig, arch: str, expected: dict) -> dict:
    """HF tensors -> {jaxlm param path: array} for the paths in `expected` (path -> shape).

    Missing tensors, extra tensors and shape mismatches raise ConfigError naming them.
    """
    top, stacks = family_layout(cfg, arch)
    out, used = {}, set()

    def take(name):
        if name not in tensors:
            raise ConfigError(f"checkpoint lacks tensor {name!r}")
        used.add(name)
        return np.asarray(tensors[name])

    for name, target, layout in top:
        paths = _paths((), target)
        if all(p in expected for p in paths):
            x = to_jax(take(name), layout, cfg)
            out.update(zip(paths, x if len(paths) > 1 else [x]))
    for prefix, root, table, layers, *first in stacks:
        at = lambda i, prefix=prefix, first=first: prefix.format(i + (first[0] if first else 0))  # noqa: E731
        for suffix, target, layout in table:
            paths = _paths(root, target)
            if not all(p in expected for p in paths):
                continue
            if "{e}" in suffix:  # one tensor an expert, stacked
                names = [[at(i) + suffix.replace("{e}", str(e)) for e in range(cfg.num_experts)] for i in range(layers)]
                per_layer = [np.stack([to_jax(take(n), layout, cfg) for n in row]) for row in names]
            else:
                per_layer = [to_jax(take(at(i) + suffix), layout, cfg) for i in range(layers)]
            for j, p in enumerate(paths):
                out[p] = np.stack([x[j] if len(paths) > 1 else x for x in per_layer])
    tied = set()
    if cfg.tie_embeddings:
        tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.weight"}
    extra = sorted(n for n in set(tensors) - used - tied if not n.endswith(_BUFFERS))
    if extra:
        more = " ..." if len(extra) > 8 else ""
        raise ConfigError(f"checkpoint has tensors jaxlm's {arch} does not use: {extra[:8]}{more}")
    missing = sorted(".".join(p) for p in set(expected) - set(out))
    if missing:
        raise ConfigError(f"no checkpoint tensor for parameters {missing}")
    for p, x in out.items():
        if tuple(x.shape) != tuple(expected[p]):
            raise ConfigError(f"tensor for {'.'.join(p)} has shape {x.shape}, the config implies {expected[p]}")
    return out


def params_to_hf(params: dict, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """{jaxlm param path: array} -> HF tensor dict (contiguous NumPy arrays)."""
    top, stacks = family_layout(cfg, arch)
    out = {}
    for name, target, layout in top:
        paths = _paths((), target)
        if all(p in params for p in paths):
            parts = [np.asarray(params[p]) for p in paths]
            out[name] = to_hf(tuple(parts) if len(parts) > 1 else parts[0], layout, cfg)
    for prefix, root, table, layers, *first in stacks:
        at = lambda i, prefix=prefix, first=first: prefix.format(i + (first[0] if first else 0))  # noqa: E731
        for suffix, target, layout in table:
            paths = _paths(root, target)
            if not all(p in params for p in paths):
                continue
            for i in range(layers):
                parts = [np.asarray(params[p][i]) for p in paths]
                if "{e}" in suffix:
                    for e in range(parts[0].shape[0]):
                        out[at(i) + suffix.replace("{e}", str(e))] = to_hf(parts[0][e], layout, cfg)
                    continue
                out[at(i) + suffix] = to_hf(tuple(parts) if len(parts) > 1 else parts[0], layout, cfg)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
