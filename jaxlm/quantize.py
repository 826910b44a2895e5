"""How a loaded model stores its frozen weights for inference: `jaxlm generate|serve --weights ...`.

  stored as the model holds them (the default off CPU).
  f32   the projections, token table and read-out unchanged in value, the projections laid out in the
        kernels' 64-column strips (`F32Weight`, `F32Table`). The default on CPU (`default_weights`): at a few
        rows XLA's CPU dot streams a weight and then computes, the kernel overlaps the two (SmolLM2-135M:
        +15% decode tokens/s at batch 1, +19% at batch 16). Prefill (many rows) takes XLA's dot either way.
  bf16  the projections, token table and read-out as bfloat16 (`BF16Weight`, `BF16Table`), every other float
        parameter cast to bfloat16; computed in the model's dtype: 2 bytes a parameter.
  int8  every projection of the layer stacks as int8 with one scale per output column (`Int8Weight`), the
        token table (and the tied read-out) as int8, one scale a token (`Int8Table`), an untied read-out as
        `Int8Weight`. Tables are stored as the strips of their transpose (`jaxlm.nn.quantized.QuantizedTable`).
  nf4   the projections as NF4 (`NF4Weight`, QLoRA's 4-bit format); the token table and read-out as int8,
        as llama.cpp's 4-bit files keep them at higher precision (the read-out's error reaches every logit).

With int8 and NF4, a mixture's expert weights are stored so too (each expert its own scales) and dequantized
whole by the experts' grouped matmuls; norms, biases, routers and position tables stay as they are. The
stored weights are converted inside the matmul (`jaxlm.ops.quant`): on CPU by the native kernels, which read
a half (bf16), a quarter (int8) or an eighth (NF4) of the bytes of f32 per decoded token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import kernels
from jaxlm.config import ConfigError
from jaxlm.nn.quantized import (
    BF16Table,
    BF16Weight,
    F32Table,
    F32Weight,
    Int8Table,
    Int8Weight,
    NF4Weight,
    QuantizedTable,
    QuantizedWeight,
)
from jaxlm.peft import projection_weights, quantize

WEIGHTS = ("stored", "f32", "bf16", "int8", "nf4")  # stored: as the model holds them


def default_weights(model) -> str | None:
    """What `jaxlm generate|serve` store a model's weights as when --weights is not given: "f32" strips where
    the native CPU kernels run (the default backend is the CPU, the kernels are built) and every projection
    weight is float32 on one device; None (as stored) elsewhere: on a GPU XLA's own dot is the fast one."""
    if jax.default_backend() != "cpu" or not kernels.available():
        return None
    for module, name, _, _ in projection_weights(model):
        w = getattr(module, name)
        a = w[...] if isinstance(w, nnx.Param) else None
        if a is None or a.dtype != jnp.float32 or (isinstance(a, jax.Array) and len(a.devices()) > 1):
            return None
    return "f32"


def store_weights(model, weights: str | None):
    """`model` with its weights stored as `weights` (in place; None or "stored" leaves them); returns the model."""
    if weights is not None and weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights in (None, "stored"):
        return model
    kinds = {
        "f32": (F32Weight, F32Table),
        "bf16": (BF16Weight, BF16Table),
        "int8": (Int8Weight, Int8Table),
        "nf4": (NF4Weight, Int8Table),
    }
    weight, table = kinds[weights]
    # Experts (read whole by their grouped matmuls, no decode kernel) gain from fewer bytes held, not from strips;
    # bf16 casts them with every other float parameter below.
    quantize(model, weight, experts=weights in ("int8", "nf4"))
    embed = getattr(model, "embed", None)
    if embed is not None and isinstance(embed.embedding, nnx.Param):
        embed.embedding = table(embed.embedding[...], axes=getattr(embed.embedding, "out_sharding", None))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nnx.Param):
        head_kind = {"f32": F32Weight, "bf16": BF16Weight}.get(weights, Int8Weight)
        model.lm_head = head_kind(head[...], n_in=1, dtype=head[...].dtype, axes=getattr(head, "out_sharding", None))
    if weights == "bf16":
        _cast(model, jnp.bfloat16)  # norms, biases, positions
    return model


def _cast(model, dtype) -> None:
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and jnp.issubdtype(v[...].dtype, jnp.floating):
            v.set_value(v[...].astype(dtype))


def weight_bytes(model) -> dict:
    """{"params": float parameters stored, "bytes": their bytes}: quantized weights count the parameters they
    stand for, and their codes and constants."""
    params = nbytes = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, QuantizedWeight):
            params, nbytes = params + max(m.layers(), 1) * m.rows * m.cols, nbytes + m.nbytes()
        elif isinstance(m, QuantizedTable):
            params, nbytes = params + m.packed()[0].size, nbytes + m.nbytes()
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        params, nbytes = params + leaf.size, nbytes + leaf.size * leaf.dtype.itemsize
    return {"params": int(params), "bytes": int(nbytes)}
