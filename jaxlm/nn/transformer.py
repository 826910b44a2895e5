"""Single-stack Transformer language model from one `ModelConfig`: causal
decoders (GPT-2, LLaMA, Mistral, Qwen2) and bidirectional encoders (BERT, with
token types, an embedding norm, the MLM head and the pooler).

The L blocks are one stacked module (every parameter has a leading `layers`
axis), run by `lax.scan` (`scan_layers`: one layer compiled once) or a Python
loop, each layer optionally rematerialised, or split into pipeline stages.
All three read the same parameters, so checkpoints do not depend on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.block import Block
from jaxlm.nn.embed import Embed, LearnedPositions
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import const_param, dtype_of, normal_param
from jaxlm.nn.stack import layer_ids, run_stack, stacked
from jaxlm.ops.attention import attention_mask
from jaxlm.ops.dense import dense
from jaxlm.ops.dropout import dropout, fold_rows
from jaxlm.ops.mlp import ACTIVATIONS
from jaxlm.ops.positions import alibi_bias, alibi_slopes, sinusoidal_positions
from jaxlm.parallel.pipeline import pipeline
from jaxlm.parallel.rules import constrain


class TransformerLM(nnx.Module):
    """tokens -> logits, optionally through a KV cache.

    Training: `logits, _ = model(tokens)`.
    Decoding: `cache = model.init_cache(B, S)`, then
    `logits, cache = model(tokens, positions, valid, cache=cache, cache_index=i)`
    writes the T new tokens at cache slots [i, i + T).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        pipeline_stages: int = 1,
        microbatches: int = 1,
        pipeline_repeats: int = 1,
    ):
        """`pipeline_stages` > 1 runs training forwards as a pipeline of `microbatches` (see
        `jaxlm.parallel.pipeline`): GPipe, or circular with `pipeline_repeats` > 1."""
        self.cfg = cfg
        self.pipeline_stages, self.microbatches, self.pipeline_repeats = pipeline_stages, microbatches, pipeline_repeats
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.positions = (
            LearnedPositions(
                cfg.max_seq_len, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if cfg.position == "learned"
            else None
        )
        self.layers = stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = (
            Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
            if cfg.norm_position == "pre"
            else None
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, param_dtype)
        )
        D, std = cfg.d_model, cfg.init_std
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
        self.token_types = (
            normal_param(rngs, (cfg.type_vocab_size, D), (None, "embed"), std, param_dtype)
            if cfg.type_vocab_size
            else None
        )
        self.embed_norm = Norm(D, **norm) if cfg.embed_norm else None
        if cfg.head == "mlm":  # BERT: dense -> activation -> norm, then the tied read-out plus a bias
            self.head_dense = normal_param(rngs, (D, D), ("embed", "embed"), std, param_dtype)
            self.head_dense_bias = const_param((D,), ("embed",), 0.0, param_dtype)
            self.head_norm = Norm(D, **norm)
            self.head_bias = const_param((cfg.vocab_size,), ("vocab",), 0.0, param_dtype)
        if cfg.pooler:
            self.pool_dense = normal_param(rngs, (D, D), ("embed", "embed"), std, param_dtype)
            self.pool_bias = const_param((D,), ("embed",), 0.0, param_dtype)

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        """Empty cache: per-layer K/V and the position of each slot (-1 = empty)."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length or cfg.max_seq_len, cfg.kv_heads, cfg.dim_per_head)
        return {
            "pos": jnp.full(shape[1:3], -1, jnp.int32),
            "k": jnp.zeros(shape, self.dtype),  # (L, B, S, K, H)
            "v": jnp.zeros(shape, self.dtype),
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
        )
        return self.logits(x), cache

    def hidden(
        self, tokens, positions=None, valid=None, *, token_types=None, cache=None, cache_index=None, dropout_keys=None
    ):
        """The final hidden states (B, T, D) (after the final norm) and the updated cache."""
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if valid is None:
            valid = jnp.ones((B, T), bool)
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(self.dtype)
        if self.token_types is not None:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + jnp.take(self.token_types[...], types, axis=0).astype(self.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = dropout(x, cfg.dropout, fold_rows(dropout_keys, 0))
        x = constrain(x, ("batch", "seq", "embed"))

        if cache is None:
            kv_pos, kv_valid, kv = positions, valid, None
        else:
            slot_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
            kv_pos = jax.lax.dynamic_update_slice(cache["pos"], slot_pos, (0, cache_index))
            kv_valid, kv = kv_pos >= 0, {"k": cache["k"], "v": cache["v"]}
        x, kv = self._run_layers(
            x,
            positions,
            valid,
            self._attention_inputs(positions, kv_pos, kv_valid),
            kv,
            cache_index,
            fold_rows(dropout_keys, 1),
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, None if cache is None else {"pos": kv_pos, **kv}

    def logits(self, x: jax.Array) -> jax.Array:
        """(B, T, D) final hidden states -> (B, T, V) float32 logits."""
        c = lambda p: p[...].astype(self.dtype)  # noqa: E731
        if self.cfg.head == "mlm":
            h = jnp.einsum("BTD,DE->BTE", x, c(self.head_dense)) + c(self.head_dense_bias)
            x = self.head_norm(ACTIVATIONS[self.cfg.activation](h))
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = dense(x, c(self.lm_head))  # BTD,DV->BTV
        if self.cfg.head == "mlm":
            logits = logits + c(self.head_bias)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))

    def pool(self, x: jax.Array) -> jax.Array:
        """BERT's pooler: tanh(dense(first token)). (B, T, D) -> (B, D)."""
        h = jnp.einsum("BD,DE->BE", x[:, 0], self.pool_dense[...].astype(self.dtype))
        return jnp.tanh(h + self.pool_bias[...].astype(self.dtype))

    def _attention_inputs(self, q_pos, kv_pos, kv_valid):
        """(mask (B, T, S), additive bias (B, N, T, S) or None) shared by every layer."""
        cfg = self.cfg
        mask = attention_mask(
            q_pos, kv_pos, kv_valid=kv_valid, causal=cfg.causal, sliding_window=cfg.sliding_window or None
        )
        bias = alibi_bias(alibi_slopes(cfg.num_heads), q_pos, kv_pos) if cfg.position == "alibi" else None
        return mask, bias

    def _run_layers(self, x, positions, valid, attn_inputs, kv, cache_index, dropout_keys):
        """x through the L stacked blocks; kv: {"k", "v"} (L, B, S, K, H) or None; dropout_keys: (B, 2) or None."""
        cfg = self.cfg
        graphdef, params = nnx.split(self.layers)
        ids = layer_ids(cfg.num_layers)

        def layers(x, params, ids, positions, attn_inputs, kv, keys):
            def layer(x, p, per_layer):
                (mask, bias), (layer_kv, i) = attn_inputs, per_layer
                x, layer_kv = nnx.merge(graphdef, p)(
                    x, positions, mask, layer_kv, cache_index, bias, dropout_keys=fold_rows(keys, i)
                )
                return constrain(x, ("batch", "seq", "embed")), layer_kv

            if kv is None:
                return run_stack(layer, params, x, (None, ids), remat=cfg.remat, scan=cfg.scans)

            # Decoding: the stacked cache is the scan's carry and each layer writes its new K/V into it in
            # place, so a step moves T tokens' keys, not the whole cache (as per-layer slices would).
            def cached(carry, p_i):
                (x, kv), (p, i) = carry, p_i
                x, kv = nnx.merge(graphdef, p)(
                    x, positions, attn_inputs[0], kv, cache_index, attn_inputs[1], layer=i.astype(jnp.int32)
                )
                return (x, kv), None

            (x, kv), _ = jax.lax.scan(cached, (x, kv), (params, ids))
            return x, kv

        if kv is None and self.pipeline_stages > 1:
            # Each stage rebuilds its micro-batch's mask: (b, T) moves, not (b, T, T). Row keys travel with
            # their rows, so dropout is the same as without the pipeline.
            def stage(p_ids, x, per_row):
                (p, stage_ids), (pos, ok, keys) = p_ids, per_row
                return layers(x, p, stage_ids, pos, self._attention_inputs(pos, pos, ok), None, keys)[0]

            x = pipeline(
                stage,
                (params, ids),
                x,
                (positions, valid, dropout_keys),
                num_stages=self.pipeline_stages,
                num_microbatches=self.microbatches,
                num_repeats=self.pipeline_repeats,
            )
            return x, None
        return layers(x, params, ids, positions, attn_inputs, kv, dropout_keys)
