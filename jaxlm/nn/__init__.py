"""Flax NNX modules: they own parameters and call `jaxlm.ops`."""

from jaxlm.nn.attention import Attention
from jaxlm.nn.block import Block
from jaxlm.nn.embed import Embed, LearnedPositions
from jaxlm.nn.mlp import MLP
from jaxlm.nn.models import build_model, count_params
from jaxlm.nn.norm import Norm
from jaxlm.nn.seq2seq import EncoderDecoderLM
from jaxlm.nn.transformer import TransformerLM

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "Embed",
    "EncoderDecoderLM",
    "LearnedPositions",
    "Norm",
    "TransformerLM",
    "build_model",
    "count_params",
]
