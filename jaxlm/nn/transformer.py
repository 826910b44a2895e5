"""Single-stack Transformer language model from one `ModelConfig`: causal decoders (GPT-2, LLaMA, Mistral,
Qwen2/3, Gemma 2/3, Phi-3) and bidirectional encoders (BERT: token types, embedding norm, MLM head, pooler).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.lm import LanguageModel
from jaxlm.nn.stack import Stack


class TransformerLM(LanguageModel):
    """tokens -> logits, optionally through a KV cache.

    Training: `logits, _ = model(tokens)`.
    Decoding: `cache = model.init_cache(B, S)`, then
    `logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=i)`
    writes the T new tokens at cache slots [i, i + T).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        def build_stacks():
            self.stack = Stack(cfg, cfg.num_layers, causal=cfg.causal, rngs=rngs)

        super().__init__(cfg, rngs=rngs, build_stacks=build_stacks)

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        """Empty cache of `length` (default max_seq_len) slots: per-layer K/V, the position of each slot."""
        return self.stack.init_cache(batch, length or self.cfg.max_seq_len)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        *,
        token_types: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        dropout_keys: jax.Array | None = None,
        layer_runner: Callable | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Forward pass: logits of every position (causal or bidirectional per `cfg.causal`).

        Args:
          tokens: (B, T) int.
          positions: (B, T) int; defaults to 0..T-1.
          valid: (B, T) bool, False for padding tokens (never attended to).
          token_types: (B, T) int segment ids (models with `type_vocab_size`); default 0.
          cache: from `init_cache`; its slots [cache_index, cache_index + T) are written.
          cache_index: int scalar (may be traced).
          dropout_keys: (B, 2) uint32, one PRNG key per row (`jaxlm.ops.dropout.row_keys`): applies
            `cfg.dropout` / `cfg.attention_dropout` / `cfg.mlp_dropout` (training). None: no dropout.
          layer_runner: runs the layers (the pipeline schedule, see `Stack`), or None.

        Returns:
          logits (B, T, V) in float32, and the updated cache (None without one).
        """
        x, cache = self.hidden(
            tokens,
            positions,
            valid,
            token_types=token_types,
            cache=cache,
            cache_index=cache_index,
            dropout_keys=dropout_keys,
            layer_runner=layer_runner,
        )
        return self.logits(x), cache

    def decode(self, tokens, positions=None, valid=None, *, cache, cache_index):
        """The generator's step: logits of `tokens` written into the cache at `cache_index` (see `__call__`)."""
        return self(tokens, positions, valid, cache=cache, cache_index=cache_index)

    def hidden(
        self,
        tokens,
        positions=None,
        valid=None,
        *,
        token_types=None,
        cache=None,
        cache_index=None,
        dropout_keys=None,
        layer_runner=None,
    ):
        """The final hidden states (B, T, D) (after the final norm) and the updated cache."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if valid is None:
            valid = jnp.ones((B, T), bool)
        return self.stack(
            self.embed_tokens(tokens, token_types),
            positions,
            valid,
            cache=cache,
            cache_index=cache_index,
            dropout_keys=dropout_keys,
            layer_runner=layer_runner,
        )
