"""Parameter-efficient fine-tuning modules: LoRA on a projection, learned prompt embeddings and learned
per-layer prefix keys/values.

Adapters are attached to a built (or loaded) model by `jaxlm.peft.apply_peft`. Their parameters are
`Adapter` variables, a subclass of `nnx.Param` that carries logical axes like every parameter; training
differentiates and optimizes only them when a `peft` method is set, and the rest of the model is frozen.
Every projection of the model reads its weight and its LoRA through `project`, so a LoRA or a quantized
weight acts wherever the weight does (self- and cross-attention, MLPs, stacked and scanned layers).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.quantized import QuantizedWeight, fusable, matmuls
from jaxlm.ops.dense import dense
from jaxlm.ops.dropout import dropout, fold_rows
from jaxlm.ops.lora import (
    embedding_lora_bank_delta,
    embedding_lora_delta,
    init_embedding_lora,
    init_lora,
    lora_bank_delta,
    lora_delta,
    lora_weight,
)


class Adapter(nnx.Param):
    """A trainable parameter of a PEFT method (everything else stays frozen)."""


def _adapter(value, axes) -> Adapter:
    return Adapter(value, out_sharding=tuple(axes), eager_sharding=False)


class LoRA(nnx.Module):
    """scale · (dropout(x)·A)·B added to a projection x·W; W (I..., O...), A (I..., R), B (R, O...).

    layers > 0: A and B get a leading `layers` axis (the adapter of a stacked layer's weight).
    """

    def __init__(
        self,
        in_shape: tuple,
        out_shape: tuple,
        *,
        in_axes: tuple,
        out_axes: tuple,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        layers: int = 0,
        param_dtype=jnp.float32,
        key: jax.Array,
    ):
        self.scale, self.dropout, self.n = scale, dropout, len(in_shape)
        self.merged = False
        lead = ("layers",) if layers else ()
        if layers:
            a, b = jax.vmap(lambda k: init_lora(k, in_shape, out_shape, rank, param_dtype))(
                jax.random.split(key, layers)
            )
        else:
            a, b = init_lora(key, in_shape, out_shape, rank, param_dtype)
        self.a = _adapter(a, (*lead, *in_axes, "lora"))
        self.b = _adapter(b, (*lead, "lora", *out_axes))

    def __call__(self, x: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        """The update of x (B, T, I...) -> (B, T, O...); zero once merged into W."""
        if self.merged:
            return None
        return lora_delta(dropout(x, self.dropout, dropout_keys), self.a[...], self.b[...], self.scale, self.n)

    def weight(self) -> jax.Array:
        """scale · A·B (layers, I..., O...) or (I..., O...), float32."""
        a, b = self.a[...], self.b[...]
        if a.ndim > self.n + 1:  # stacked over layers
            return jax.vmap(lambda a, b: lora_weight(a, b, self.scale))(a, b)
        return lora_weight(a, b, self.scale)


class ExpertLoRA(nnx.Module):
    """One LoRA per expert of a mixture's stacked expert weight W (layers, E, I, O): A (layers, E, I, R) random,
    B (layers, E, R, O) zeros (peft's init), each expert's update scale · A_e·B_e. Applied inside the experts'
    grouped matmuls (`jaxlm.ops.moe.run_experts`), each row with its own expert's pair."""

    def __init__(
        self, layers: int, experts: int, dim_in: int, dim_out: int, *, rank, scale, in_axis, out_axis, param_dtype, key
    ):
        keys = jax.random.split(key, layers * experts)
        a, b = jax.vmap(lambda k: init_lora(k, (dim_in,), (dim_out,), rank, param_dtype))(keys)
        self.a = _adapter(a.reshape(layers, experts, dim_in, rank), ("layers", "experts", in_axis, "lora"))
        self.b = _adapter(b.reshape(layers, experts, rank, dim_out), ("layers", "experts", "lora", out_axis))
        self.scale, self.merged = scale, False

    def pair(self, dtype):
        """(A, B, scale) of this layer's slice (the model sees its layer's (E, I, R), (E, R, O)), or None once merged."""
        return None if self.merged else (self.a[...].astype(dtype), self.b[...].astype(dtype), self.scale)

    def weight(self) -> jax.Array:
        """scale · A_e·B_e for every layer and expert: (layers, E, I, O), float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return self.scale * jnp.einsum("LEIR,LERO->LEIO", a, b)


class EmbeddingLoRA(nnx.Module):
    """scale · A[tokens]·B added to a token embedding (V, D): A (V, R) zeros, B (R, D) normal (peft)."""

    def __init__(self, vocab: int, dim: int, *, rank: int, scale: float, param_dtype=jnp.float32, key: jax.Array):
        a, b = init_embedding_lora(key, vocab, dim, rank, param_dtype)
        self.a = _adapter(a, ("vocab", "lora"))
        self.b = _adapter(b, ("lora", "embed"))
        self.scale, self.merged = scale, False

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array | None:
        if self.merged:
            return None
        return embedding_lora_delta(tokens, self.a[...], self.b[...], self.scale, dtype)

    def weight(self) -> jax.Array:
        return lora_weight(self.a[...], self.b[...], self.scale)


class AdapterBank(nnx.Variable):
    """Frozen LoRA weights of several adapters served together (multi-LoRA serving)."""


class AdapterRows(nnx.Variable):
    """Which adapter each row of a step uses, one-hot (B, M): set for every step by `select_adapters`."""


class LoRABank(nnx.Module):
    """M LoRAs of one projection, each row of a batch using its own (or none): multi-LoRA serving (S-LoRA,
    Sheng et al. 2023; vLLM's punica kernels). A (I..., M, R), B (M, R, O...), scales (M,); with `layers`, a
    leading layers axis on each. Adapters of lower rank are zero-padded to the largest R, and an adapter that
    does not adapt this weight has zeros. Read through `project` like a `LoRA`."""

    def __init__(self, a, b, scales, *, n: int, in_axes: tuple, out_axes: tuple, layers: int = 0):
        self.n = n
        lead = ("layers",) if layers else ()
        self.a = _bank(a, (*lead, *in_axes, None, "lora"))
        self.b = _bank(b, (*lead, None, "lora", *out_axes))
        self.scales = _bank(scales, (*lead, None))
        self.rows = _rows(a.shape[-2], layers)

    def __call__(self, x: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        """Each row's update of x (B, T, I...) -> (B, T, O...)."""
        rows = _selected(self.rows, x.shape[0])
        return lora_bank_delta(x, self.a[...], self.b[...], self.scales[...], rows, self.n)


class EmbeddingLoRABank(nnx.Module):
    """M `EmbeddingLoRA`s of the token table, each row using its own: A (V, M, R), B (M, R, D), scales (M,)."""

    def __init__(self, a, b, scales):
        self.a = _bank(a, ("vocab", None, "lora"))
        self.b = _bank(b, (None, "lora", "embed"))
        self.scales = _bank(scales, (None,))
        self.rows = _rows(a.shape[1], 0)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        rows = _selected(self.rows, tokens.shape[0])
        return embedding_lora_bank_delta(tokens, self.a[...], self.b[...], self.scales[...], rows, dtype)


def _bank(value, axes) -> AdapterBank:
    return AdapterBank(jnp.asarray(value), out_sharding=tuple(axes), eager_sharding=False)


def _rows(adapters: int, layers: int) -> AdapterRows:
    lead = (layers,) if layers else ()  # stacked with the layer's weights, sliced with them
    return AdapterRows(jnp.zeros((*lead, 0, adapters), jnp.float32))


def _selected(rows: AdapterRows, batch: int) -> jax.Array:
    r = rows[...]
    if r.shape != (batch, r.shape[-1]):
        raise ValueError(
            f"the adapter banks' rows are {r.shape[:-1]}, the batch has {batch}: choose each row's adapter with "
            "jaxlm.nn.adapters.select_adapters before calling the model"
        )
    return r


def adapter_count(state) -> int:
    """M, the adapters of the banks in `state` (a model's nnx.State, or a pytree of them); 0 without banks."""
    leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return next((v.shape[-1] for v in leaves if isinstance(v, AdapterRows)), 0)


def select_adapters(state, adapters: jax.Array, count: int):
    """`state` with every bank's rows set to `adapters` (B,) int: 0 the base model, i the i-th adapter."""
    rows = jax.nn.one_hot(adapters - 1, count, dtype=jnp.float32)  # 0 -> a zero row: no adapter
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v: v.replace(rows) if isinstance(v, AdapterRows) else v, state, is_leaf=is_var)


def project(owner: nnx.Module, name: str, x: jax.Array, n: int = 1, dropout_keys: jax.Array | None = None):
    """x·W (+ its LoRA) for the weight `owner.<name>`: contracts x's last n dims, in `owner.dtype`."""
    return projects(owner, (name,), x, n, dropout_keys)[0]


def projects(owner: nnx.Module, names: tuple[str, ...], x: jax.Array, n: int = 1, dropout_keys=None) -> tuple:
    """`project` for several weights that take the same x (attention's q, k, v): quantized weights of one kind
    in one kernel call (`jaxlm.nn.quantized.matmuls`; a decode step's calls each have a fixed cost)."""
    ws = [getattr(owner, name) for name in names]
    if len(ws) > 1 and fusable(ws):
        ys = matmuls(ws, x.astype(owner.dtype), n)
    else:
        ys = [_base(w, x, n, owner.dtype) for w in ws]
    out = []
    for name, y in zip(names, ys):
        lora = getattr(owner, "lora_" + name, None)
        keys = fold_rows(dropout_keys, zlib.crc32(name.encode()) >> 1)  # one dropout stream per weight
        delta = None if lora is None else lora(x, keys)
        out.append(y if delta is None else y + delta.astype(y.dtype))
    return tuple(out)


def _base(w, x: jax.Array, n: int, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):  # dequantized inside the matmul
        return w.matmul(x.astype(dtype), n)
    return dense(x, w[...].astype(dtype), n)


class PromptEmbedding(nnx.Module):
    """Prompt tuning (Lester et al. 2021): P virtual token embeddings (P, D) placed before the input."""

    def __init__(self, init: jax.Array):
        self.embedding = _adapter(init, (None, "embed"))

    def __call__(self, batch: int, dtype) -> jax.Array:
        """(B, P, D)."""
        e = self.embedding[...].astype(dtype)
        return jnp.broadcast_to(e[None], (batch, *e.shape))


class PrefixKV(nnx.Module):
    """Prefix tuning (Li & Liang 2021; P-tuning v2): learned keys and values for every layer, (L, P, K, H) each.

    With `hidden` > 0 they are reparameterized while training, as Li & Liang do: an embedding (P, D) through
    Linear(D, hidden) -> tanh -> Linear(hidden, L·2·K·H) (peft's `prefix_projection`); `fold` replaces the
    network by its output for inference and export.
    """

    def __init__(
        self, layers: int, length: int, kv_heads: int, head_dim: int, dim: int, *, hidden: int, key: jax.Array
    ):
        self.shape = (layers, length, kv_heads, head_dim)
        k1, k2, k3 = jax.random.split(key, 3)
        width = 2 * layers * kv_heads * head_dim
        if hidden:  # peft: nn.Embedding (normal 0, 1) and nn.Linear layers (Kaiming-uniform, uniform bias)
            self.embedding = _adapter(jax.random.normal(k1, (length, dim)), (None, "embed"))
            self.w1, self.b1 = _linear(k2, dim, hidden)
            self.w2, self.b2 = _linear(k3, hidden, width)
            self.kv = nnx.data(None)  # set by `fold`
        else:  # peft: nn.Embedding(P, L·2·K·H), normal(0, 1)
            self.kv = _adapter(jax.random.normal(k1, (length, width)), (None, None))

    def flat(self) -> jax.Array:
        """(P, L·2·K·H): peft's `prompt_embeddings` (what its checkpoints store)."""
        if self.kv is not None:
            return self.kv[...]
        h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
        return h @ self.w2[...] + self.b2[...]

    def __call__(self, dtype) -> dict:
        """{"k", "v"}: (L, P, K, H) each, in `dtype`."""
        L, P, K, H = self.shape
        kv = self.flat().reshape(P, L, 2, K, H).astype(dtype)  # peft's order: layer-major, then key/value
        return {"k": kv[:, :, 0].transpose(1, 0, 2, 3), "v": kv[:, :, 1].transpose(1, 0, 2, 3)}

    def fold(self) -> None:
        """Replace the reparameterization by its output (inference, export)."""
        if self.kv is None:
            self.kv = _adapter(self.flat(), (None, None))
            del self.embedding, self.w1, self.b1, self.w2, self.b2


def _linear(key, fan_in: int, fan_out: int):
    bound = fan_in**-0.5  # torch nn.Linear's default init
    kw, kb = jax.random.split(key)
    w = jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound)
    b = jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
    return _adapter(w, (None, None)), _adapter(b, (None,))
