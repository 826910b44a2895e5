"""How a loaded model stores its frozen weights for inference: `jaxlm generate|serve --weights bf16|int8|nf4`.

  bf16  the projections, token table and read-out as bfloat16 (`BF16Weight`, `BF16Table`), every other float
        parameter cast to bfloat16; computed in the model's dtype: 2 bytes a parameter.
  int8  every projection of the layer stacks as int8 with one scale per output column (`Int8Weight`), the
        token table (and the tied read-out) as int8 rows (`Int8Table`), an untied read-out as `Int8Weight`.
  nf4   the projections as NF4 (`NF4Weight`, QLoRA's 4-bit format); the token table and read-out as int8,
        as llama.cpp's 4-bit files keep them at higher precision (the read-out's error reaches every logit).

With int8 and NF4, norms, biases and position tables stay as they are. The stored weights are converted inside
the matmul (`jaxlm.ops.quant`): on CPU by the native kernels, which read a half (bf16), a quarter (int8) or an
eighth (NF4) of the bytes of f32 per decoded token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.nn.quantized import BF16Table, BF16Weight, Int8Table, Int8Weight, NF4Weight, QuantizedTable, QuantizedWeight
from jaxlm.peft import quantize

WEIGHTS = ("bf16", "int8", "nf4")


def store_weights(model, weights: str | None):
    """`model` with its weights stored as `weights` (in place; None leaves them); returns the model."""
    if weights is None:
        return model
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    kinds = {"bf16": (BF16Weight, BF16Table), "int8": (Int8Weight, Int8Table), "nf4": (NF4Weight, Int8Table)}
    weight, table = kinds[weights]
    quantize(model, weight)
    embed = getattr(model, "embed", None)
    if embed is not None and isinstance(embed.embedding, nnx.Param):
        embed.embedding = table(embed.embedding[...], axes=getattr(embed.embedding, "out_sharding", None))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nnx.Param):
        head_kind = BF16Weight if weights == "bf16" else Int8Weight
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
