"""The layer stack of every model class: positions -> L blocks -> final norm.

`Stack` is used once by decoders and encoders (`TransformerLM`) and twice by
encoder-decoders (`EncoderDecoderLM`: a bidirectional encoder, a causal decoder
with cross-attention), so every position, mask and norm option acts the same in
each. Its blocks are one stacked module (`stacked`: every parameter gains a
leading `layers` axis) run by `run_stack`: `lax.scan` (one layer compiled once)
or a Python loop, each layer optionally rematerialised; or by a layer runner
the caller passes in (the pipeline schedule of sharded training). All read the
same parameters, so checkpoints do not depend on how the layers run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.axes import constrain
from jaxlm.config import ModelConfig
from jaxlm.nn.block import Block
from jaxlm.nn.embed import LearnedPositions
from jaxlm.nn.moe import record
from jaxlm.nn.norm import norm_for
from jaxlm.nn.param import dtype_of, normal_param
from jaxlm.ops.attention import MaskSpec, PositionBias, attention_mask
from jaxlm.ops.cache import contiguous_table, paged_read, paged_write, write_rows
from jaxlm.ops.dropout import dropout, fold_rows
from jaxlm.ops.masks import NO_WINDOW
from jaxlm.ops.positions import alibi_bias, alibi_slopes, sinusoidal_positions, t5_bias

REMAT_POLICIES = {
    "full": None,  # save only each layer's input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, redo attention
}


def layer_ids(num: int) -> jax.Array:
    """(L,) uint32 layer indices, scanned with the layers: layer i folds its dropout keys with i."""
    return jnp.arange(num, dtype=jnp.uint32)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of `make(rngs)`, parameters stacked on axis 0 (`layers`)."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(key):
        return make(nnx.Rngs(params=key))

    return build(jax.random.split(rngs.params(), num))


def run_stack(layer: Callable, params, x: jax.Array, per_layer=None, *, remat: str = "none", scan: bool = True):
    """x through the stacked layers.

    Args:
      layer: (x, params_i, per_layer_i) -> (x, out_i).
      params: pytree of (L, ...) stacked parameters.
      per_layer: pytree of (L, ...) per-layer inputs (e.g. KV caches), or None.

    Returns:
      (x, outs stacked (L, ...)) .
    """
    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(lambda x, a: layer(x, *a), x, (params, per_layer))
    outs = []
    for i in range(jax.tree.leaves(params)[0].shape[0]):
        at = lambda a, i=i: a[i]  # noqa: E731
        x, out = layer(x, jax.tree.map(at, params), jax.tree.map(at, per_layer))
        outs.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs and outs[0] is not None else None


class Stack(nnx.Module):
    """Embedded tokens (B, T, D) -> final hidden states (B, T, D), through positions, L blocks and the final norm.

    Dropout streams of the row keys: 0 embeddings, 1 layers (folded with the layer index), 2 the final norm's
    output (`final_dropout`, T5).
    """

    def __init__(
        self, cfg: ModelConfig, num_layers: int, *, causal: bool, rngs: nnx.Rngs, cross=False, final_dropout=False
    ):
        """causal: decoder (each token sees earlier ones) or encoder (all); cross: blocks attend to `memory`."""
        self.cfg, self.num_layers, self.causal, self.final_dropout = cfg, num_layers, causal, final_dropout
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.dtype = dtype
        self.positions = (
            LearnedPositions(
                cfg.max_seq_len, cfg.d_model, std=cfg.init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if cfg.position == "learned"
            else None
        )
        self.relative_bias = (  # T5: one table per stack, shared by its layers
            normal_param(rngs, (cfg.relative_buckets, cfg.num_heads), (None, "heads"), cfg.init_std, param_dtype)
            if cfg.position == "relative"
            else None
        )
        self.embed_norm = norm_for(cfg) if cfg.embed_norm else None
        # Residual projections are scaled at init for this stack's depth.
        layer_cfg = dataclasses.replace(cfg, num_layers=num_layers)
        # A mixture of experts may keep dense MLPs in its first layers (DeepSeek): a stack of those first, then
        # `layers` holds the rest; layer i of the model is dense_layers[i] or layers[i - first].
        self.first = cfg.first_dense_layers
        dense_cfg = layer_cfg.without_experts()
        self.dense_layers = (
            stacked(lambda r: Block(dense_cfg, rngs=r, cross=cross), self.first, rngs) if self.first else None
        )
        self.layers = stacked(lambda r: Block(layer_cfg, rngs=r, cross=cross), num_layers - self.first, rngs)
        self.final_norm = norm_for(cfg) if cfg.norm_position == "pre" else None
        self.local_layers = tuple(cfg.is_local(i) for i in range(num_layers))  # sliding-window layers
        # Blockwise attention takes the masks' and biases' inputs (B, T) and builds each tile itself.
        self.blockwise = cfg.attention_impl == "blockwise"

    def init_cache(self, batch: int, length: int) -> dict:
        """Empty self-attention cache of `batch` rows of `length` slots: a pool of `batch` blocks of `length`
        slots (`jaxlm.ops.cache`) with the contiguous table (row b is block b). The position of each slot
        (-1 = empty), K and V of every layer. A paged cache (the engine's) is the same pool of more, smaller
        blocks, with the table of each step's rows set by its caller."""
        cfg = self.cfg
        shape = (self.num_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
        k_shape = v_shape = shape
        if cfg.kv_lora_rank:  # latent attention caches the latent ("k") and the shared RoPE key ("v")
            k_shape, v_shape = shape[:3] + (1, cfg.kv_lora_rank), shape[:3] + (1, cfg.qk_rope_head_dim)
        return {
            "pos": jnp.full((batch, length), -1, jnp.int32),  # (NB, Z)
            "k": jnp.zeros(k_shape, self.dtype),  # (L, NB, Z, K, H)
            "v": jnp.zeros(v_shape, self.dtype),
            "table": contiguous_table(batch),  # (B, nb)
        }

    def memory_kv(self, memory: jax.Array) -> dict:
        """Every layer's cross-attention K/V of encoder states (B, S, D): {"k", "v"}: (L, B, S, K, H)."""
        groups = [g for g in (self.dense_layers, self.layers) if g is not None]
        kv = []
        for group in groups:
            graphdef, params = nnx.split(group)
            kv.append(jax.vmap(lambda p, g=graphdef: nnx.merge(g, p).cross.memory_kv(memory))(params))
        return jax.tree.map(lambda *a: jnp.concatenate(a), *kv)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        *,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        memory: dict | None = None,
        memory_valid: jax.Array | None = None,
        dropout_keys: jax.Array | None = None,
        layer_runner: Callable | None = None,
        segments: jax.Array | None = None,
        prefix: jax.Array | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """Final hidden states and the updated cache.

        Args:
          x: (B, T, D) token embeddings.
          positions: (B, T) int; valid: (B, T) bool, False for padding (never attended to).
          cache: from `init_cache` (or a paged pool with the table of these B rows, and optionally "layers": the
            layers' parameters unstacked, a tuple of L trees, run as an unrolled loop); each row b writes its
            logical slots [cache_index[b], cache_index[b] + T) (writes past its blocks are dropped) and attends
            to its slots below cache_index[b] + T; cache_index: (B,) int, or a scalar for all rows.
          memory: cross-attention K/V from `memory_kv` (a decoder with `cross`); memory_valid: (B, S) bool.
          dropout_keys: (B, 2) row keys (training), or None: no dropout.
          segments: (B, T) int ids of packed examples (attention stays inside each; without a cache), or None.
          prefix: (B, T) bool, a prefix LM's bidirectional part (causal stacks), or None.
          layer_runner: runs the layers instead of `run_stack` (training without a cache), e.g. the pipeline:
            `layer_runner(stage, (params, layer ids), x, (positions, valid, dropout_keys)) -> x`, where
            `stage(params_and_ids, x, per_row) -> x` runs a contiguous group of layers.
        """
        cfg = self.cfg
        if self.positions is not None:
            x = x + self.positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(self.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = constrain(dropout(x, cfg.dropout, fold_rows(dropout_keys, 0)), ("batch", "seq", "embed"))
        flags = {}  # the mask's segment and prefix-LM inputs
        if segments is not None:
            if cache is not None:
                raise ValueError("segment ids (packed examples) are for training, not decoding with a cache")
            flags.update(q_segments=segments, kv_segments=segments)
        if cache is not None:
            B, T = x.shape[:2]
            table = cache["table"]
            slot_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
            pos_pool = paged_write(cache["pos"], slot_pos, table, cache_index, floor=cache.get("floor"))
            kv_pos = paged_read(pos_pool, table, fill=-1)  # (B, nb * Z): the rows' own slots
            # A row's cache is its slots below its end: blocks it took over may hold an earlier owner's entries.
            end = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (B,)) + T
            kv_valid = (kv_pos >= 0) & (jnp.arange(kv_pos.shape[1])[None] < end[:, None])
            kv = {"k": cache["k"], "v": cache["v"], "table": table, "floor": cache.get("floor")}
            unstacked = cache.get("layers")
        if prefix is not None:
            kv_prefix = prefix
            if cache is not None:  # only the new tokens' prefix matters: earlier slots precede them anyway
                kv_prefix = write_rows(jnp.zeros(kv_pos.shape, bool), prefix, cache_index)
            flags.update(q_prefix=prefix, kv_prefix=kv_prefix)
        if cache is None:
            kv_pos, kv_valid, kv = positions, valid, None
        memory_mask = None
        if memory is not None:
            B, T = positions.shape
            if self.blockwise:  # no positions across: every query sees the valid encoder states
                zeros = jnp.zeros((B, 1), jnp.int32)
                memory_mask = MaskSpec(zeros, zeros, kv_valid=memory_valid, causal=False)
            else:
                memory_mask = jnp.broadcast_to(memory_valid[:, None, :], (B, T, memory_valid.shape[1]))
        keys = fold_rows(dropout_keys, 1)
        _, params = nnx.split(self.layers)
        if layer_runner is not None and kv is None:
            if memory is not None or self.first:
                raise ValueError("a layer runner (pipeline) runs single-stack models of one kind of layer only")

            def stage(p_ids, x, per_row):  # each stage rebuilds its micro-batch's masks: (b, T) moves, not (b, T, T)
                (p, ids), (pos, ok, seg, pre, row_keys) = p_ids, per_row
                flags = {} if seg is None else dict(q_segments=seg, kv_segments=seg)
                if pre is not None:
                    flags.update(q_prefix=pre, kv_prefix=pre)
                inputs = self._attention_inputs(pos, pos, ok, flags)
                # The routers' statistics stay inside the schedule: training refuses router losses with it.
                return self._layers(x, p, ids, pos, inputs, None, None, None, row_keys, collect=False)[0]

            per_row = (positions, valid, segments, prefix, keys)
            x = layer_runner(stage, (params, layer_ids(self.num_layers)), x, per_row)
        else:
            inputs = self._attention_inputs(positions, kv_pos, kv_valid, flags)
            ids, n = layer_ids(self.num_layers), self.first
            part = lambda lo, hi: None if memory is None else jax.tree.map(lambda m: m[lo:hi], memory)  # noqa: E731
            if self.dense_layers is not None:  # the dense first layers (stacked: a scan even when decoding)
                dense = self.dense_layers
                x, kv = self._layers(
                    x,
                    nnx.split(dense)[1],
                    ids[:n],
                    positions,
                    inputs,
                    kv,
                    cache_index,
                    (part(0, n), memory_mask),
                    keys,
                    graphdef=nnx.graphdef(dense),
                )
            if kv is not None and unstacked is not None:
                params = unstacked
            rest = (part(n, None), memory_mask)
            x, kv = self._layers(x, params, ids[n:], positions, inputs, kv, cache_index, rest, keys, first=n)
        if self.final_norm is not None:
            x = self.final_norm(x)
            if self.final_dropout:
                x = dropout(x, cfg.dropout, fold_rows(dropout_keys, 2))
        return x, None if cache is None else {**cache, "pos": pos_pool, "k": kv["k"], "v": kv["v"]}

    def _attention_inputs(self, q_pos, kv_pos, kv_valid, flags):
        """(global mask, sliding-window mask, additive bias): masks (B, T, S) or None where no layer needs them.
        Blockwise attention: `MaskSpec`s and a `PositionBias` instead (the window a traced scalar, so that a
        layer scan can pick between them).

        flags: `attention_mask`'s segment and prefix keyword arguments."""
        cfg = self.cfg
        if self.blockwise:
            spec = lambda window: MaskSpec(q_pos, kv_pos, kv_valid, window=window, causal=self.causal, **flags)  # noqa: E731
            full = spec(None) if not any(self.local_layers) else spec(jnp.int32(NO_WINDOW))
            return full, spec(jnp.int32(cfg.sliding_window or NO_WINDOW)), self._bias_fn()
        full = self._mask(q_pos, kv_pos, kv_valid, None, flags) if not all(self.local_layers) else None
        local = self._mask(q_pos, kv_pos, kv_valid, cfg.sliding_window, flags) if any(self.local_layers) else None
        bias = None
        if cfg.position == "alibi":
            bias = alibi_bias(alibi_slopes(cfg.num_heads), q_pos, kv_pos)
        elif self.relative_bias is not None:
            bias = t5_bias(
                self.relative_bias[...],
                q_pos,
                kv_pos,
                bidirectional=not self.causal,
                max_distance=cfg.relative_max_distance,
            )
        return full, local, bias

    def _bias_fn(self) -> PositionBias | None:
        """The additive bias as a function of positions (ALiBi, T5's learned table), or None."""
        cfg = self.cfg
        if cfg.position == "alibi":
            return PositionBias(alibi_slopes(cfg.num_heads), alibi_bias)
        if self.relative_bias is not None:
            t5 = functools.partial(t5_bias, bidirectional=not self.causal, max_distance=cfg.relative_max_distance)
            return PositionBias(self.relative_bias[...], t5)
        return None

    def _mask(self, q_pos, kv_pos, kv_valid, window, flags):
        return attention_mask(q_pos, kv_pos, kv_valid=kv_valid, causal=self.causal, sliding_window=window, **flags)

    def _layers(
        self,
        x,
        params,
        ids,
        positions,
        attn_inputs,
        kv,
        cache_index,
        memory,
        keys,
        collect=True,
        graphdef=None,
        first=0,
    ):
        """x through the stacked blocks; kv: {"k", "v": (L, NB, Z, K, H), "table"} or None; memory: (K/V, mask)
        or None; collect: hand the routers' statistics to an enclosing `router_stats()` (without a cache).
        graphdef: of the blocks (default `layers`'); first: the model layer of params' first (ids are global)."""
        cfg = self.cfg
        graphdef = graphdef or nnx.graphdef(self.layers)
        full, local_mask, bias = attn_inputs
        memory, memory_mask = memory or (None, None)
        pattern = self.local_layers

        def masks(i):
            if all(pattern) or not any(pattern):
                return pattern[0], local_mask if pattern[0] else full
            local = jnp.asarray(pattern)[i]
            if self.blockwise:
                return local, dataclasses.replace(full, window=jnp.where(local, local_mask.window, full.window))
            return local, jnp.where(local, local_mask, full)

        def run(x, p, i, layer_memory, **cache):
            local, mask = masks(i)
            return nnx.merge(graphdef, p)(
                x,
                positions=positions,
                mask=mask,
                bias=bias,
                local=local,
                memory=layer_memory,
                memory_mask=memory_mask,
                dropout_keys=fold_rows(keys, i),
                **cache,
            )

        if kv is None:

            def layer(x, p, per_layer):
                x, _, stats = run(x, p, *per_layer)
                return constrain(x, ("batch", "seq", "embed")), stats

            x, stats = run_stack(layer, params, x, (ids, memory), remat=cfg.remat, scan=cfg.scans)
            if collect:
                record(stats)  # the routers' statistics (L, ...), to an enclosing `router_stats()`
            return x, None

        # Decoding: each layer writes its new K/V into the stacked cache in place, so a step moves T tokens' keys,
        # not the whole cache. Unstacked parameters (a tuple, one tree a layer) run as an unrolled loop: a scan
        # slices each layer's weights out of the stack, a copy that triples a decode step's weight traffic on CPU.
        if isinstance(params, (tuple, list)):
            for i, p in enumerate(params):
                layer_memory = None if memory is None else jax.tree.map(lambda m, i=i: m[i], memory)
                x, kv, _ = run(x, p, ids[i], layer_memory, cache=kv, cache_index=cache_index, layer=first + i)
            return x, kv

        def cached(carry, per_layer):
            (x, kv), (p, i, layer_memory) = carry, per_layer
            x, kv, _ = run(x, p, i, layer_memory, cache=kv, cache_index=cache_index, layer=i.astype(jnp.int32))
            return (x, kv), None

        (x, kv), _ = jax.lax.scan(cached, (x, kv), (params, ids, memory))
        return x, kv
