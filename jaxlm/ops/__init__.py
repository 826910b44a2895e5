"""Pure functions, arrays in and arrays out: the math of jaxlm."""

from jaxlm.ops.attention import attention_mask, dot_product_attention
from jaxlm.ops.dropout import dropout
from jaxlm.ops.losses import cross_entropy
from jaxlm.ops.mlp import activation, gated_mlp, mlp
from jaxlm.ops.norms import layer_norm, rms_norm
from jaxlm.ops.positions import apply_rope, rope_frequencies, sinusoidal_positions
from jaxlm.ops.sampling import sample

__all__ = [
    "activation",
    "apply_rope",
    "attention_mask",
    "cross_entropy",
    "dot_product_attention",
    "dropout",
    "gated_mlp",
    "layer_norm",
    "mlp",
    "rms_norm",
    "rope_frequencies",
    "sample",
    "sinusoidal_positions",
]
