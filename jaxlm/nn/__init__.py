"""Flax NNX modules: they own parameters and call `jaxlm.ops`."""

from jaxlm.nn.attention import Attention
from jaxlm.nn.block import Block
from jaxlm.nn.embed import Embed, LearnedPositions
from jaxlm.nn.mlp import MLP
from jaxlm.nn.norm import Norm
from jaxlm.nn.transformer import TransformerLM, count_params

__all__ = ["MLP", "Attention", "Block", "TransformerLM", "Embed", "LearnedPositions", "Norm", "count_params"]
