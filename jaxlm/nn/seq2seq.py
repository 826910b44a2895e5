"""Encoder-decoder Transformer: the original Transformer (Vaswani et al. 2017:
sinusoidal positions, post-norm) and T5 (Raffel et al. 2020: relative position
bias shared across layers, pre-norm RMSNorm, no biases; v1.1 gated GELU).

The token embedding is shared by encoder, decoder and (when tied) the read-out.
The decoder's cross-attention keys and values are computed from the encoder
states once (`init_cache`), so decoding a token costs one decoder step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.nn.block import Block
from jaxlm.nn.embed import Embed
from jaxlm.nn.norm import Norm
from jaxlm.nn.param import dtype_of, normal_param
from jaxlm.nn.stack import layer_ids, run_stack, stacked
from jaxlm.ops.attention import attention_mask
from jaxlm.ops.dropout import dropout, fold_rows
from jaxlm.ops.positions import sinusoidal_positions, t5_bias
from jaxlm.parallel.rules import constrain


class EncoderDecoderLM(nnx.Module):
    """(source tokens, target tokens) -> target logits.

    Training: `logits = model(src, tgt_in, src_valid)`.
    Decoding: `memory = model.encode(src, src_valid)`, `cache = model.init_cache(memory, src_valid, S)`, then
    `logits, cache = model.decode(tokens, positions, cache=cache, cache_index=i)`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        D, N = cfg.d_model, cfg.num_heads
        self.embed = Embed(cfg.vocab_size, D, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Residual projections are scaled for the depth of each stack, as in the single-stack model.
        dec_cfg = dataclasses.replace(cfg, num_layers=cfg.decoder_layers)
        self.encoder = stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.decoder = stacked(lambda r: Block(dec_cfg, rngs=r, cross=True), cfg.decoder_layers, rngs)
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, param_dtype=param_dtype)
        pre = cfg.norm_position == "pre"
        self.encoder_norm = Norm(D, **norm) if pre else None
        self.decoder_norm = Norm(D, **norm) if pre else None
        if cfg.position == "relative":  # one table per stack, shared by its layers
            shape = (cfg.relative_buckets, N)
            self.encoder_bias = normal_param(rngs, shape, (None, "heads"), cfg.init_std, param_dtype)
            self.decoder_bias = normal_param(rngs, shape, (None, "heads"), cfg.init_std, param_dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else normal_param(rngs, (D, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, param_dtype)
        )

    def _embed(self, tokens, positions, dropout_keys):
        cfg = self.cfg
        x = self.embed(tokens)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(self.dtype)
        x = dropout(x, cfg.dropout, fold_rows(dropout_keys, 0))
        return constrain(x, ("batch", "seq", "embed"))

    def _final(self, x, keys):
        """T5 drops each stack's final-norm output too (stream 2; 0: embeddings, 1: layers)."""
        return dropout(x, self.cfg.dropout, fold_rows(keys, 2))

    def _bias(self, table, q_pos, kv_pos, bidirectional):
        if self.cfg.position != "relative":
            return None
        cfg = self.cfg
        return t5_bias(table[...], q_pos, kv_pos, bidirectional=bidirectional, max_distance=cfg.relative_max_distance)

    def encode(
        self, src: jax.Array, src_valid: jax.Array | None = None, dropout_keys: jax.Array | None = None
    ) -> jax.Array:
        """(B, S) source tokens -> (B, S, D) encoder states; padding (src_valid False) is never attended to.

        dropout_keys: (B, 2) row keys (training, see `TransformerLM.__call__`), or None.
        """
        keys = fold_rows(dropout_keys, 0)  # the encoder's streams; the decoder's fold 1
        B, S = src.shape
        pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        valid = jnp.ones((B, S), bool) if src_valid is None else src_valid
        mask = attention_mask(pos, pos, kv_valid=valid, causal=False)
        bias = self._bias(getattr(self, "encoder_bias", None), pos, pos, True)
        graphdef, params = nnx.split(self.encoder)

        layer_keys = fold_rows(keys, 1)

        def layer(x, p, i):
            x, _ = nnx.merge(graphdef, p)(x, pos, mask, None, None, bias, dropout_keys=fold_rows(layer_keys, i))
            return constrain(x, ("batch", "seq", "embed")), None

        x, _ = run_stack(
            layer,
            params,
            self._embed(src, pos, keys),
            layer_ids(self.cfg.num_layers),
            remat=self.cfg.remat,
            scan=self.cfg.scans,
        )
        return x if self.encoder_norm is None else self._final(self.encoder_norm(x), keys)

    def memory_kv(self, memory: jax.Array) -> dict:
        """Every decoder layer's cross-attention K/V of the encoder states: {"k", "v"}: (L, B, S, K, H)."""
        graphdef, params = nnx.split(self.decoder)
        return jax.vmap(lambda p: nnx.merge(graphdef, p).cross.memory_kv(memory))(params)

    def init_cache(self, memory: jax.Array, src_valid: jax.Array | None, length: int) -> dict:
        """Decoding cache: self-attention K/V slots for `length` target tokens and the cross-attention K/V."""
        cfg = self.cfg
        B, S = memory.shape[:2]
        shape = (cfg.decoder_layers, B, length, cfg.kv_heads, cfg.dim_per_head)
        cross = self.memory_kv(memory)
        return {
            "pos": jnp.full((B, length), -1, jnp.int32),
            "k": jnp.zeros(shape, self.dtype),
            "v": jnp.zeros(shape, self.dtype),
            "ck": cross["k"],
            "cv": cross["v"],
            "src_valid": jnp.ones((B, S), bool) if src_valid is None else src_valid,
        }

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
    ) -> tuple[jax.Array, dict | None]:
        """Target tokens (B, T) -> float32 logits (B, T, V), attending to `memory` or to the cache's encoder K/V.

        dropout_keys: (B, 2) row keys (training), or None.
        """
        cfg = self.cfg
        keys = fold_rows(dropout_keys, 1)
        layer_keys = fold_rows(keys, 1)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        valid = jnp.ones((B, T), bool) if valid is None else valid
        if cache is None:
            kv_pos, kv_valid, kv = positions, valid, None
            cross = self.memory_kv(memory)
            src_valid = jnp.ones(memory.shape[:2], bool) if src_valid is None else src_valid
        else:
            slot_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
            kv_pos = jax.lax.dynamic_update_slice(cache["pos"], slot_pos, (0, cache_index))
            kv_valid, kv = kv_pos >= 0, {"k": cache["k"], "v": cache["v"]}
            cross, src_valid = {"k": cache["ck"], "v": cache["cv"]}, cache["src_valid"]
        mask = attention_mask(positions, kv_pos, kv_valid=kv_valid)
        memory_mask = jnp.broadcast_to(src_valid[:, None, :], (B, T, src_valid.shape[1]))
        bias = self._bias(getattr(self, "decoder_bias", None), positions, kv_pos, False)
        graphdef, params = nnx.split(self.decoder)

        def layer(x, p, per_layer):
            layer_kv, layer_cross, i = per_layer
            x, layer_kv = nnx.merge(graphdef, p)(
                x,
                positions,
                mask,
                layer_kv,
                cache_index,
                bias,
                layer_cross,
                memory_mask,
                dropout_keys=fold_rows(layer_keys, i),
            )
            return constrain(x, ("batch", "seq", "embed")), layer_kv

        x, kv = run_stack(
            layer,
            params,
            self._embed(tokens, positions, keys),
            (kv, cross, layer_ids(cfg.decoder_layers)),
            remat=cfg.remat,
            scan=cfg.scans or kv is not None,  # caches are written in place by the scan (see TransformerLM)
        )
        if self.decoder_norm is not None:
            x = self._final(self.decoder_norm(x), keys)
        if cfg.scale_readout:
            x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(self.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        new_cache = None if cache is None else {**cache, "pos": kv_pos, **kv}
        return logits, new_cache

    def __call__(self, src, tgt, src_valid=None, tgt_valid=None, dropout_keys=None) -> jax.Array:
        """Teacher-forced logits (B, T, V) of target inputs `tgt` given sources `src`; dropout_keys: (B, 2) or None."""
        memory = self.encode(src, src_valid, dropout_keys)
        return self.decode(tgt, valid=tgt_valid, memory=memory, src_valid=src_valid, dropout_keys=dropout_keys)[0]
