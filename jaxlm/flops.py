"""Model FLOPs per token, for MFU (PaLM, Chowdhery et al. 2022, appendix B)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.nn.models import active_params


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in each token's matmuls: all but the embedding lookup tables (and, with
    experts, but the experts the token is not routed to)."""
    n = active_params(cfg)
    n -= cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0  # lookup only; tied table is the read-out
    n -= cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
    return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N for the weight matmuls (forward + backward) plus 12·L·heads·head_dim·T for
    attention scores and mixing, counting the full T x T matrix as PaLM does."""
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    return 6 * matmul_params(cfg) + attn
