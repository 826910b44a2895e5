"""Attach parameter-efficient fine-tuning to a model (NNX surgery), merge LoRA into the weights and back.

`apply_peft(model, cfg.peft, seed=...)` adds the method's `Adapter` parameters to a built or loaded model:

  lora   a `LoRA` on every targeted projection, by role: q, k, v, o (self- and cross-attention), gate, up, down
         (the plain MLP's w_in is `up`), embed (the token table) and lm_head (an untied read-out).
  qlora  the same LoRAs, and every projection weight of the layer stacks stored as NF4 (`NF4Weight`), a
         mixture's expert weights too (each expert its own blocks); the embedding, norms, routers and read-out
         stay as they are (as QLoRA keeps them).
  prompt `PromptEmbedding`: virtual tokens before the input (decoders).
  prefix `PrefixKV`: learned keys/values of every layer (decoders).

`trainable(cfg.peft)` is the filter of what trains: every `nnx.Param` without a method, else the `Adapter`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ConfigError, PeftConfig
from jaxlm.nn.adapters import (
    Adapter,
    EmbeddingLoRA,
    EmbeddingLoRABank,
    ExpertLoRA,
    LoRA,
    LoRABank,
    PrefixKV,
    PromptEmbedding,
)
from jaxlm.nn.moe import MoE
from jaxlm.nn.quantized import NF4Weight, QuantizedWeight
from jaxlm.ops.lora import lora_scale

# role -> (block submodule kind, weight attribute, input axes, output axes) of a stacked layer's projection
PROJECTIONS = {
    "q": ("attention", "wq", ("embed",), ("heads", "head_dim")),
    "k": ("attention", "wk", ("embed",), ("kv_heads", "head_dim")),
    "v": ("attention", "wv", ("embed",), ("kv_heads", "head_dim")),
    "o": ("attention", "wo", ("heads", "head_dim"), ("embed",)),
    "gate": ("mlp", "w_gate", ("embed",), ("mlp",)),
    "up": ("mlp", "w_up", ("embed",), ("mlp",)),
    "down": ("mlp", "w_out", ("mlp",), ("embed",)),
}
PLAIN_MLP = {"w_up": "w_in"}  # the plain (GPT-2) MLP's input projection plays `up`
EXPERT_ROLES = {"gate": "w_gate", "up": "w_up", "down": "w_out"}  # a mixture's expert weights, per role


def trainable(pc: PeftConfig):
    """The nnx filter of trained parameters."""
    return nnx.Param if pc.method == "none" else Adapter


def stacks(model) -> list:
    """The model's layer stacks: [stack] (decoders, encoders) or [encoder, decoder]."""
    return [model.stack] if hasattr(model, "stack") else [model.encoder, model.decoder]


def _modules(block, kind: str) -> list:
    if kind == "mlp":  # a mixture of experts has no dense MLP (its experts are not adapted)
        return [block.mlp] if block.mlp is not None else []
    return [m for m in (block.attn, block.cross) if m is not None]


def apply_peft(model, pc: PeftConfig, *, seed: int = 0, init_ids: list[int] | None = None):
    """Adds `pc`'s adapters to `model` in place and returns it; ConfigError when they do not fit the model.

    init_ids: prompt tuning's initial text as token ids (`pc.prompt_init_text`), or None for random vectors.
    """
    if pc.method == "none":
        return model
    cfg = model.cfg
    # New heads train with the adapters (peft's modules_to_save): a reward model's score, PPO's value head.
    for name in ("score", "value_head", "value_bias") if cfg.head == "score" or cfg.value_head else ():
        if hasattr(model, name):
            p = getattr(model, name)
            setattr(model, name, Adapter(p[...], out_sharding=p.get_metadata("out_sharding"), eager_sharding=False))
    key = jax.random.PRNGKey(seed)
    param_dtype = model.embed.embedding[...].dtype
    if pc.method in ("lora", "qlora"):
        scale = lora_scale(pc.alpha, pc.rank, pc.rslora)
        if cfg.kv_lora_rank and {"q", "k", "v"} & set(pc.targets):
            raise ConfigError(
                "peft.targets q/k/v: latent attention (model.kv_lora_rank) has no such projections; target o"
            )
        if cfg.first_dense_layers:
            raise ConfigError("LoRA on a model with dense first layers (model.first_dense_layers) is not supported yet")
        if "gate" in pc.targets and cfg.mlp != "gated":
            raise ConfigError("peft.targets has gate, but the model's MLP is not gated (model.mlp=plain)")
        n = 0
        for stack in stacks(model):
            block, layers = stack.layers, stack.num_layers - stack.first  # (a dense first group is not adapted)
            if cfg.num_experts:  # one LoRA per expert of each adapted expert weight
                for role in set(pc.targets) & set(EXPERT_ROLES):
                    name = EXPERT_ROLES[role] if cfg.mlp == "gated" or role != "up" else "w_in"
                    w = getattr(block.moe, name)[...]  # (layers, E, I, O)
                    in_axis, out_axis = ("mlp", "embed") if role == "down" else ("embed", "mlp")
                    lora = ExpertLoRA(
                        *w.shape,
                        rank=pc.rank,
                        scale=scale,
                        in_axis=in_axis,
                        out_axis=out_axis,
                        param_dtype=w.dtype,
                        key=jax.random.fold_in(key, 2000 + n),
                    )
                    setattr(block.moe, "lora_" + name, lora)
                    n += 1
            for role in pc.targets:
                if role not in PROJECTIONS:
                    continue
                kind, name, in_axes, out_axes = PROJECTIONS[role]
                for module in _modules(block, kind):
                    name = PLAIN_MLP.get(name, name) if not hasattr(module, name) else name
                    w = getattr(module, name)[...]
                    k = len(in_axes)
                    lora = LoRA(
                        w.shape[1 : 1 + k],
                        w.shape[1 + k :],
                        in_axes=in_axes,
                        out_axes=out_axes,
                        rank=pc.rank,
                        scale=scale,
                        dropout=pc.dropout,
                        layers=layers,
                        param_dtype=w.dtype,
                        key=jax.random.fold_in(key, n),
                    )
                    setattr(module, "lora_" + name, lora)
                    n += 1
        if "embed" in pc.targets:
            V, D = model.embed.embedding.shape
            model.embed.lora_embedding = EmbeddingLoRA(
                V, D, rank=pc.rank, scale=scale, param_dtype=param_dtype, key=jax.random.fold_in(key, 1000)
            )
        if "lm_head" in pc.targets:
            if model.lm_head is None:
                raise ConfigError(
                    "peft.targets has lm_head, but the read-out is tied to the token embedding "
                    "(model.tie_embeddings=true): adapt `embed` instead"
                )
            D, V = model.lm_head.shape
            model.lora_lm_head = LoRA(
                (D,),
                (V,),
                in_axes=("embed",),
                out_axes=("vocab",),
                rank=pc.rank,
                scale=scale,
                dropout=pc.dropout,
                param_dtype=param_dtype,
                key=jax.random.fold_in(key, 1001),
            )
        if pc.method == "qlora":
            quantize(model)
    elif pc.method == "prompt":
        P, D = pc.virtual_tokens, cfg.d_model
        if init_ids:  # peft: the text's ids repeated to P tokens, their embeddings
            ids = jnp.asarray((list(init_ids) * (P // len(init_ids) + 1))[:P])
            init = jnp.take(model.embed.embedding[...], ids, axis=0).astype(jnp.float32)
        else:  # peft's RANDOM init: nn.Embedding's normal(0, 1)
            init = jax.random.normal(key, (P, D))
        model.prompt = PromptEmbedding(init.astype(param_dtype))
    elif pc.method == "prefix":
        model.stack.prefix = PrefixKV(
            cfg.num_layers,
            pc.virtual_tokens,
            cfg.kv_heads,
            cfg.dim_per_head,
            cfg.d_model,
            hidden=pc.prefix_hidden,
            key=key,
        )
    return model


def projection_weights(model, *, experts: bool = False):
    """(owner module, weight attribute, stacked layers, input dims) of every projection of the layer stacks;
    experts: and of the mixtures' expert stacks (E, I, O) (input dims 1)."""
    for stack in stacks(model):
        layers = stack.num_layers - stack.first
        for kind, name, in_axes, _ in PROJECTIONS.values():
            for module in _modules(stack.layers, kind):
                attr = PLAIN_MLP.get(name, name) if not hasattr(module, name) else name
                if hasattr(module, attr):  # a plain MLP has no gate
                    yield module, attr, layers, len(in_axes)
        moe = getattr(stack.layers, "moe", None)
        for name in ("w_gate", "w_up", "w_in", "w_out") if experts and moe is not None else ():
            if hasattr(moe, name):
                yield moe, name, layers, 1


def quantize(model, kind: type[QuantizedWeight] = NF4Weight, *, experts: bool = True) -> None:
    """Stores every projection weight of the layer stacks as `kind` (NF4: QLoRA's base; or int8), in place;
    experts: the mixtures' expert weights too, each expert quantized apart."""
    for module, name, layers, n_in in projection_weights(model, experts=experts):
        w = getattr(module, name)
        if isinstance(w, nnx.Param):
            axes = getattr(w, "out_sharding", None)
            stack = isinstance(module, MoE)
            setattr(module, name, kind(w[...], n_in=n_in, layers=layers, experts=stack, dtype=w[...].dtype, axes=axes))


def dequantize(model) -> None:
    """Every quantized projection weight back to a (frozen) parameter holding its dequantized values (in
    place): what a QLoRA model computes with, so LoRA can be merged into it."""
    for module, name, _, _ in projection_weights(model, experts=True):
        w = getattr(module, name)
        if isinstance(w, QuantizedWeight):
            setattr(module, name, nnx.Param(w[...], out_sharding=w.axes, eager_sharding=False))


def loras(model) -> list[tuple]:
    """(path of the adapted weight, its owner module, the weight's attribute name, LoRA) of every LoRA in the
    model, the embedding's included: `<owner>.lora_<name>` adapts `<owner>.<name>`."""
    out = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, (LoRA, EmbeddingLoRA, ExpertLoRA)) and path:
            owner = _walk(model, path[:-1])
            name = "embedding" if isinstance(module, EmbeddingLoRA) else str(path[-1])[len("lora_") :]
            out.append((tuple(path[:-1]) + (name,), owner, name, module))
    return out


def merge(model) -> None:
    """W <- W + scale·A·B for every LoRA, which then adds nothing (in place; `unmerge` undoes it)."""
    _shift(model, +1.0, merged=True)


def unmerge(model) -> None:
    """W <- W - scale·A·B: the base weights back (to float rounding), the LoRAs active again."""
    _shift(model, -1.0, merged=False)


def _shift(model, sign: float, merged: bool) -> None:
    for _, owner, name, lora in loras(model):
        if lora.merged == merged:
            continue
        w = getattr(owner, name)
        if not isinstance(w, nnx.Param):
            raise ConfigError(f"cannot merge a LoRA into the quantized weight {name}: dequantize the base first")
        w.set_value((w[...].astype(jnp.float32) + sign * lora.weight()).astype(w[...].dtype))
        lora.merged = merged


# ------------------------------------------------------------------------------------------ multi-LoRA


def take_loras(model) -> dict[tuple, tuple]:
    """Removes every LoRA from `model` (in place) and returns them: {path of the adapted weight: (A, B, scale,
    n input dims, or 0 for the token embedding's)}, the values `attach_lora_banks` takes."""
    out = {}
    for path, owner, name, lora in loras(model):
        if lora.merged:
            raise ConfigError(f"the LoRA of {'.'.join(map(str, path))} is merged into its weight")
        n = 0 if isinstance(lora, EmbeddingLoRA) else lora.n
        out[path] = (lora.a[...], lora.b[...], lora.scale, n)
        delattr(owner, "lora_" + name)
    return out


def attach_lora_banks(model, adapters: list[dict]) -> None:
    """Gives every weight that one of `adapters` (each `take_loras`'s dict) adapts a `LoRABank` of all M of them,
    in order (in place): a batch's rows then each use their own adapter, or none (`select_adapters`). Ranks
    are zero-padded to the largest; an adapter that leaves a weight alone has zeros there."""
    M = len(adapters)
    for path in sorted({p for a in adapters for p in a}, key=str):
        entries = [a.get(path) for a in adapters]
        a0, b0, _, n = next(e for e in entries if e is not None)
        R = max(e[0].shape[-1] for e in entries if e is not None)
        owner = _walk(model, path[:-1])
        lead = a0.shape[: a0.ndim - n - 1] if n else ()  # (L,) for a stacked layer's weight
        a = jnp.zeros((*a0.shape[:-1], M, R), a0.dtype)  # ([L], I..., M, R); the embedding's (V, M, R)
        b = jnp.zeros((*lead, M, R, *b0.shape[len(lead) + 1 :]), b0.dtype)  # ([L], M, R, O...)
        scales = jnp.zeros((*lead, M), jnp.float32)
        for m, e in enumerate(entries):
            if e is None:
                continue
            ea, eb, scale, _ = e
            r = ea.shape[-1]
            a = a.at[..., m, :r].set(ea)
            b = b.at[(slice(None),) * len(lead) + (m, slice(0, r))].set(eb)
            scales = scales.at[..., m].set(scale)
        if n == 0:
            bank = EmbeddingLoRABank(a, b, scales)
        else:
            axes = tuple(getattr(owner, path[-1]).out_sharding)[len(lead) :]  # the weight's (I..., O...)
            layers = lead[0] if lead else 0
            bank = LoRABank(a, b, scales, n=n, in_axes=axes[:n], out_axes=axes[n:], layers=layers)
        setattr(owner, "lora_" + str(path[-1]), bank)


def _walk(model, path: tuple):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model
