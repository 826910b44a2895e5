"""Single-stack Transformer language model from one `ModelConfig`: causal decoders (GPT-2, LLaMA, Mistral,
Qwen2/3, Gemma 2/3, Phi-3) and bidirectional encoders (BERT: token types, embedding norm, MLM head, pooler).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import context_size
from jaxlm.config import ModelConfig
from jaxlm.nn.lm import LanguageModel, at_positions
from jaxlm.nn.stack import Stack
from jaxlm.ops.cache import paged_write
from jaxlm.parallel.context import unzigzag, zigzag

NOWHERE = 2**30  # a cache index past every block table: the write is dropped


class TransformerLM(LanguageModel):
    """tokens -> logits, optionally through a KV cache.

    Training: `logits, _ = model(tokens)`.
    Decoding: `cache = model.init_cache(B, S)`, then
    `logits, cache = model.decode(tokens, positions, valid, cache=cache, cache_index=i)`
    writes the T new tokens at cache slots [i, i + T). A paged engine uses `paged_cache` and `start_rows`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        def build_stacks():
            self.stack = Stack(cfg, cfg.num_layers, causal=cfg.causal, rngs=rngs)

        super().__init__(cfg, rngs=rngs, build_stacks=build_stacks)

    @property
    def virtual_tokens(self) -> int:
        """P, the leading positions and cache slots that prompt or prefix tuning occupies (0 without)."""
        prompt, prefix = getattr(self, "prompt", None), getattr(self.stack, "prefix", None)
        return prompt.embedding.shape[0] if prompt is not None else prefix.shape[1] if prefix is not None else 0

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        """Cache of `length` (default max_seq_len) slots for the caller: per-layer K/V, the position of each slot.

        Prompt and prefix tuning put their P virtual tokens in P more slots before them, filled here; `decode`
        keeps cache indices and positions relative to the caller's slots.
        """
        P = self.virtual_tokens
        cache = self.stack.init_cache(batch, (length or self.cfg.max_seq_len) + P)
        if not P:
            return cache
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (batch, P))
        if getattr(self, "prompt", None) is not None:  # the virtual tokens' keys and values, through every layer
            valid = jnp.ones((batch, P), bool)
            return self.stack(self.prompt(batch, self.dtype), positions, valid, cache=cache, cache_index=0)[1]
        kv = self.stack.prefix(cache["k"].dtype)  # (L, P, K, H): the learned keys and values themselves
        fill = lambda c, x: c.at[:, :, :P].set(jnp.broadcast_to(x[:, None], (x.shape[0], batch, *x.shape[1:])))  # noqa: E731
        return {
            **cache,
            "pos": cache["pos"].at[:, :P].set(positions),
            "k": fill(cache["k"], kv["k"]),
            "v": fill(cache["v"], kv["v"]),
        }

    def paged_cache(self, blocks: int, block_size: int) -> dict:
        """A pool of `blocks` KV blocks of `block_size` slots for a paged engine, which sets the block table of
        each step's rows. Prompt and prefix tuning's P virtual slots are kept apart ("virtual") and written
        into the first P slots of each new row by `start_rows`."""
        cache = self.stack.init_cache(blocks, block_size)
        del cache["table"]
        P = self.virtual_tokens
        if P:
            v = self.init_cache(1, 1)
            cache["virtual"] = {"pos": v["pos"][0, :P], "k": v["k"][:, 0, :P], "v": v["v"][:, 0, :P]}
        return cache

    def start_rows(self, cache: dict, fresh: jax.Array) -> dict:
        """A paged cache with the virtual slots written at slots [0, P) of the rows (of its table) where
        `fresh` (B,) is set: rows that start a new context. Without virtual tokens: the cache unchanged."""
        if "virtual" not in cache:
            return cache
        v, table = cache["virtual"], cache["table"]
        B = table.shape[0]
        index = jnp.where(fresh, 0, NOWHERE)
        rows = lambda a: jnp.broadcast_to(a, (B, *a.shape))  # noqa: E731
        write = lambda pool, new: paged_write(pool, rows(new), table, index)  # noqa: E731
        return {
            **cache,
            "pos": write(cache["pos"], v["pos"]),
            "k": jax.vmap(write)(cache["k"], v["k"]),  # every layer's pool (L, NB, Z, K, H)
            "v": jax.vmap(write)(cache["v"], v["v"]),
        }

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
        segments: jax.Array | None = None,
        prefix: jax.Array | None = None,
        last: jax.Array | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Forward pass: logits of every position (causal or bidirectional per `cfg.causal`).

        Args:
          tokens: (B, T) int.
          positions: (B, T) int; defaults to 0..T-1.
          valid: (B, T) bool, False for padding tokens (never attended to).
          token_types: (B, T) int segment ids (models with `type_vocab_size`); default 0.
          cache: from `init_cache`; each row b writes slots [cache_index[b], cache_index[b] + T) (writes past the
            end are dropped); cache_index: (B,) int, or a scalar for all rows.
          dropout_keys: (B, 2) uint32, one PRNG key per row (`jaxlm.ops.dropout.row_keys`): applies
            `cfg.dropout` / `cfg.attention_dropout` / `cfg.mlp_dropout` (training). None: no dropout.
          layer_runner: runs the layers (the pipeline schedule, see `Stack`), or None.
          segments: (B, T) int ids of packed examples: attention stays inside each (positions should restart).
          prefix: (B, T) bool, the bidirectional prefix of a prefix LM (causal models).
          last: (B,) int, or None: read out only this position of each row (a generator's next token), so the
            vocabulary projection costs one position a row rather than T.

        Returns:
          logits (B, T, V) in float32 ((B, 1, V) with `last`), and the updated cache (None without one).
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
            segments=segments,
            prefix=prefix,
        )
        return self.logits(x if last is None else at_positions(x, last)), cache

    def decode(self, tokens, positions=None, valid=None, *, cache, cache_index, last=None):
        """The generator's step: logits of `tokens` written into the cache at `cache_index` (see `__call__`)."""
        return self(tokens, positions, valid, cache=cache, cache_index=cache_index, last=last)

    def _split_sequence(self, C, tokens, positions, valid, token_types, run):
        """Context parallelism: the sequence in the zig-zag layout (`jaxlm.parallel.context`), padded to a
        multiple of 2C with invalid tokens, through the stack; the final states back in order."""
        B, T = tokens.shape
        Tp = -(-T // (2 * C)) * 2 * C

        def order(a, fill=0):
            if a is None:
                return None
            a = jnp.pad(a, ((0, 0), (0, Tp - T)), constant_values=fill) if Tp > T else a
            return zigzag(a, C)

        run = {**run, "segments": order(run["segments"]), "prefix": order(run["prefix"], False)}
        x = self.embed_tokens(order(tokens), order(token_types))
        x, _ = self.stack(x, order(positions), order(valid, False), **run)
        return unzigzag(x, C)[:, :T]

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
        segments=None,
        prefix=None,
    ):
        """The final hidden states (B, T, D) (after the final norm) and the updated cache."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if valid is None:
            valid = jnp.ones((B, T), bool)
        P = self.virtual_tokens
        run = dict(dropout_keys=dropout_keys, layer_runner=layer_runner, segments=segments, prefix=prefix)
        C = context_size()
        if C > 1 and cache is None:
            if P:
                raise ValueError("prompt and prefix tuning do not run under context parallelism (mesh.context > 1)")
            return self._split_sequence(C, tokens, positions, valid, token_types, run), None
        x = self.embed_tokens(tokens, token_types)
        if not P:
            return self.stack(x, positions, valid, cache=cache, cache_index=cache_index, **run)
        # Prompt / prefix tuning: P virtual tokens at positions 0..P-1 come first, the input follows them.
        if segments is not None or layer_runner is not None:
            raise ValueError("prompt and prefix tuning take one example per row, without a pipeline")
        positions = positions + P
        if cache is not None:
            return self.stack(x, positions, valid, cache=cache, cache_index=cache_index + P, **run)
        if getattr(self, "prompt", None) is None:  # prefix: through a cache that holds the learned keys/values
            x, _ = self.stack(x, positions, valid, cache=self.init_cache(B, T), cache_index=P, **run)
            return x, None
        ones = jnp.ones((B, P), bool)
        inputs = jnp.concatenate([self.prompt(B, x.dtype), x], axis=1)
        virtual = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        if prefix is not None:
            run["prefix"] = jnp.concatenate([ones, prefix], axis=1)
        x, _ = self.stack(inputs, jnp.concatenate([virtual, positions], 1), jnp.concatenate([ones, valid], 1), **run)
        return x[:, P:], None
