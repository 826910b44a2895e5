"""Encoder-decoder Transformer: the original Transformer (Vaswani et al. 2017:
sinusoidal positions, post-norm) and T5 (Raffel et al. 2020: relative position
bias shared across layers, pre-norm RMSNorm, no biases; v1.1 gated GELU).

Two `Stack`s (the one layer stack of every model class): a bidirectional
encoder and a causal decoder with cross-attention. The token embedding is
shared by encoder, decoder and (when tied) the read-out. The decoder's
cross-attention keys and values are computed from the encoder states once
(`init_cache`), so decoding a token costs one decoder step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.lm import LanguageModel, at_positions
from jaxlm.nn.stack import Stack
from jaxlm.ops.dropout import fold_rows


class EncoderDecoderLM(LanguageModel):
    """(source tokens, target tokens) -> target logits.

    Training: `logits = model(src, tgt_in, src_valid)`.
    Decoding: `cache = model.init_cache(B, S, source=src, source_valid=src_valid)`, then
    `logits, cache = model.decode(tokens, positions, cache=cache, cache_index=i)`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        def build_stacks():  # T5 also drops each stack's final-norm output
            self.encoder = Stack(cfg, cfg.num_layers, causal=False, final_dropout=True, rngs=rngs)
            self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, final_dropout=True, rngs=rngs)

        super().__init__(cfg, rngs=rngs, build_stacks=build_stacks)

    def encode(
        self, src: jax.Array, src_valid: jax.Array | None = None, dropout_keys: jax.Array | None = None
    ) -> jax.Array:
        """(B, S) source tokens -> (B, S, D) encoder states; padding (src_valid False) is never attended to.

        dropout_keys: (B, 2) row keys (training, see `TransformerLM.__call__`), or None.
        """
        B, S = src.shape
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid = jnp.ones((B, S), bool) if src_valid is None else src_valid
        x, _ = self.encoder(self.embed_tokens(src), pos, valid, dropout_keys=fold_rows(dropout_keys, 0))
        return x

    def init_cache(self, batch: int, length: int, *, source: jax.Array, source_valid: jax.Array | None = None):
        """Decoding cache: self-attention slots for `length` target tokens, and the cross-attention K/V of the
        encoded `source` (B, S) (computed once here)."""
        return {**self.decoder.init_cache(batch, length), **self._memory(source, source_valid)}

    def paged_cache(self, blocks: int, block_size: int, *, source: jax.Array, source_valid: jax.Array | None = None):
        """A paged engine's cache: a pool of `blocks` self-attention blocks of `block_size` slots (the engine
        sets each step's block table, and its rows' indices into `source`, "rows"), and the cross-attention
        K/V of every row of `source` (R, S)."""
        cache = self.decoder.init_cache(blocks, block_size)
        del cache["table"]
        return {**cache, **self._memory(source, source_valid)}

    def start_rows(self, cache: dict, fresh: jax.Array) -> dict:
        return cache  # no virtual tokens

    def _memory(self, source, source_valid):
        valid = jnp.ones(source.shape, bool) if source_valid is None else source_valid
        cross = self.decoder.memory_kv(self.encode(source, valid))
        return {"ck": cross["k"], "cv": cross["v"], "src_valid": valid}

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        *,
        memory: jax.Array | None = None,
        src_valid: jax.Array | None = None,
        cache: dict | None = None,
        cache_index=None,
        dropout_keys: jax.Array | None = None,
        last: jax.Array | None = None,
        readout: bool = True,
    ) -> tuple[jax.Array, dict | None]:
        """Target tokens (B, T) -> float32 logits (B, T, V), attending to `memory` or to the cache's encoder K/V.

        dropout_keys: (B, 2) row keys (training), or None. last: (B,) int, or None: logits (B, 1, V) at this
        position of each row only. readout: False returns the final states (B, T, D) instead of logits.
        """
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        valid = jnp.ones((B, T), bool) if valid is None else valid
        if cache is None:
            cross, self_cache = self.decoder.memory_kv(memory), None
            src_valid = jnp.ones(memory.shape[:2], bool) if src_valid is None else src_valid
        else:
            cross, src_valid = {"k": cache["ck"], "v": cache["cv"]}, cache["src_valid"]
            if "rows" in cache:  # a paged engine's step: the memory of the rows it serves
                cross = {n: jnp.take(c, cache["rows"], axis=1, mode="clip") for n, c in cross.items()}
                src_valid = jnp.take(src_valid, cache["rows"], axis=0, mode="clip")
            self_cache = {k: cache[k] for k in ("pos", "k", "v", "table", "layers") if k in cache}
        x, self_cache = self.decoder(
            self.embed_tokens(tokens),
            positions,
            valid,
            cache=self_cache,
            cache_index=cache_index,
            memory=cross,
            memory_valid=src_valid,
            dropout_keys=fold_rows(dropout_keys, 1),
        )
        x = x if last is None else at_positions(x, last)
        return self.logits(x) if readout else x, None if cache is None else {**cache, **self_cache}

    def __call__(self, src, tgt, src_valid=None, tgt_valid=None, dropout_keys=None) -> jax.Array:
        """Teacher-forced logits (B, T, V) of target inputs `tgt` given sources `src`; dropout_keys: (B, 2) or None."""
        return self.logits(self.hidden(src, tgt, src_valid, tgt_valid, dropout_keys))

    def hidden(self, src, tgt, src_valid=None, tgt_valid=None, dropout_keys=None) -> jax.Array:
        """The decoder's final states (B, T, D) of `__call__`, before the read-out."""
        memory = self.encode(src, src_valid, dropout_keys)
        return self.decode(
            tgt, valid=tgt_valid, memory=memory, src_valid=src_valid, dropout_keys=dropout_keys, readout=False
        )[0]
