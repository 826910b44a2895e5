"""How a loaded model stores its frozen weights for inference: `jaxlm generate|serve --weights bf16|int8|nf4`.

  bf16  every floating-point parameter stored in bfloat16 (computed in the model's dtype): 2 bytes a parameter;
        for GPUs and TPUs, whose XLA fuses the conversion into the matmul (XLA:CPU does not: slower than f32).
  int8  every projection of the layer stacks as int8 with one scale per output column (`Int8Weight`), the
        token table (and the tied read-out) as int8 rows (`Int8Table`), an untied read-out as `Int8Weight`.
  nf4   the projections as NF4 (`NF4Weight`, QLoRA's 4-bit format); the token table and read-out as int8,
        as llama.cpp's 4-bit files keep them at higher precision (the read-out's error reaches every logit).

Norms, biases and position tables stay as they are. int8 and NF4 weights are dequantized inside the matmul
(`jaxlm.ops.quant`): on CPU by the native kernels, which read a quarter (int8) or an eighth (NF4) of the
bytes of f32 per decoded token.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.nn.quantized import Int8Table, Int8Weight, NF4Weight, QuantizedWeight
from jaxlm.peft import quantize

WEIGHTS = ("bf16", "int8", "nf4")
log = logging.getLogger(__name__)


def store_weights(model, weights: str | None):
    """`model` with its weights stored as `weights` (in place; None leaves them); returns the model."""
    if weights is None:
        return model
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "bf16":
        if jax.default_backend() == "cpu":
            log.warning(
                "--weights bf16 on CPU: XLA converts every weight to float32 each step, which is slower than "
                "float32 weights (5x on SmolLM2-135M); --weights int8 is smaller and faster here"
            )
        _cast(model, jnp.bfloat16)
        return model
    quantize(model, Int8Weight if weights == "int8" else NF4Weight)
    embed = getattr(model, "embed", None)
    if embed is not None and isinstance(embed.embedding, nnx.Param):
        embed.embedding = Int8Table(embed.embedding[...], axes=getattr(embed.embedding, "out_sharding", None))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nnx.Param):
        model.lm_head = Int8Weight(head[...], n_in=1, dtype=head[...].dtype, axes=getattr(head, "out_sharding", None))
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
            lead = m.packed()[0].shape[0] if m.packed()[0].ndim > m._ndim else 1
            params, nbytes = params + lead * m.rows * m.cols, nbytes + m.nbytes()
        elif isinstance(m, Int8Table):
            params, nbytes = params + m.q.size, nbytes + m.nbytes()
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        params, nbytes = params + leaf.size, nbytes + leaf.size * leaf.dtype.itemsize
    return {"params": int(params), "bytes": int(nbytes)}
