"""Hugging Face `peft` adapter directories <-> jaxlm adapters: LoRA, prompt tuning and prefix tuning.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, as `PeftModel.save_pretrained`
writes them and `PeftModel.from_pretrained(base, DIR)` reads them. Tensor names follow the base model's
module names (the family's layout table gives them): `base_model.model.<module>.lora_A.weight` (R, in) and
`lora_B.weight` (out, R) for a projection, `lora_embedding_A` (R, V) / `lora_embedding_B` (D, R) for the token
table, `prompt_embeddings` for prompt (P, D) and prefix (P, L·2·K·H) tuning.

Fused Hugging Face tensors (GPT-2's `c_attn` holds q, k and v; Phi-3's `qkv_proj`, `gate_up_proj`) carry one
LoRA where jaxlm has one per projection: export writes them block-diagonally (rank n·R, its alpha in
`rank_pattern`/`alpha_pattern` so the scale stays), import gives each projection the shared A and its rows of B.
Both are exact.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxlm.config import LORA_TARGETS, PeftConfig
from jaxlm.data.tokenizer import DataError
from jaxlm.errors import ConfigError
from jaxlm.hf.families import layout as family_layout
from jaxlm.hf.weights import _paths
from jaxlm.nn.adapters import EmbeddingLoRA, LoRA
from jaxlm.nn.quantized import QuantizedWeight
from jaxlm.ops.lora import lora_scale

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# jaxlm weight attribute -> LoRA target role (jaxlm.peft.PROJECTIONS read backwards)
ROLES = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w_gate": "gate", "w_up": "up", "w_in": "up", "w_out": "down"}
# adapter_config.json entries that change what a LoRA computes, and the values jaxlm implements
LORA_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: not a peft adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(conf, dict) or "peft_type" not in conf:
        raise DataError(f"{path} has no peft_type")
    return conf


class _Modules:
    """The base model's Hugging Face module names <-> jaxlm weight paths, from the family's layout table.

    A module is (name format with {} for the layer, layers or 0, [jaxlm weight paths of its slots]).
    """

    def __init__(self, cfg, arch: str):
        top, stacks = family_layout(cfg, arch)
        entries = [(name, (), target, 0) for name, target, _ in top]
        entries += [(prefix + s, root, target, n) for prefix, root, table, n, *_ in stacks for s, target, _ in table]
        self.of_path, self.named = {}, {}
        for name, root, target, layers in entries:
            if not name.endswith(".weight"):
                continue
            module, paths = name[: -len(".weight")], _paths(root, target)
            for j, p in enumerate(paths):
                self.of_path[p] = (module, layers, paths, j)
            for i in range(max(layers, 1)):
                self.named[module.format(i) if layers else module] = (module, layers, paths, i)

    def target(self, module: str) -> str:
        """The peft target_modules entry of a module: its name inside a layer (or whole, outside the stacks)."""
        return module.split("{}.", 1)[-1]


def _weight_shape(model, path: tuple, layers: int) -> tuple:
    """One layer's shape of the weight at `path` (NF4 weights too)."""
    owner = model
    for p in path[:-1]:
        owner = getattr(owner, p)
    w = getattr(owner, path[-1])
    if isinstance(w, QuantizedWeight):
        return w.shape
    return tuple(w[...].shape)[1 if layers else 0 :]


def _loras(model) -> dict[tuple, LoRA | EmbeddingLoRA]:
    """{path of the adapted weight: its LoRA}."""
    from jaxlm.peft import loras

    return {path: lora for path, _, _, lora in loras(model)}


# ---------------------------------------------------------------------------------------------- export


def save_adapter(model, out: str | Path, pc: PeftConfig, *, arch: str, base: str | None = None) -> dict:
    """Writes `model`'s adapter as a peft adapter directory; returns the adapter config written."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    if cfg.head == "score":
        raise ConfigError(
            "a reward model's adapters come with its trained score head: write the merged model "
            "(`jaxlm convert --to-hf RUN --merge`)"
        )
    if pc.method in ("lora", "qlora") and cfg.num_experts and {"gate", "up", "down"} & set(pc.targets):
        raise ConfigError(
            "per-expert LoRA (peft.targets gate/up/down on a mixture of experts) has no peft adapter format jaxlm "
            "writes yet: write the merged model (`jaxlm convert --to-hf RUN --merge`)"
        )
    if pc.method in ("lora", "qlora"):
        tensors, conf = _lora_export(model, pc, arch)
    elif pc.method == "prompt":
        P, D = model.prompt.embedding.shape
        tensors = {"prompt_embeddings": np.asarray(model.prompt.embedding[...], np.float32)}
        conf = dict(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=D)
        conf.update(num_attention_heads=cfg.num_heads, prompt_tuning_init="RANDOM")
    elif pc.method == "prefix":
        L, P, K, H = model.stack.prefix.shape
        tensors = {"prompt_embeddings": np.asarray(model.stack.prefix.flat(), np.float32)}
        conf = dict(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=K * H)
        conf.update(num_attention_heads=K, encoder_hidden_size=K * H, prefix_projection=False)
    else:
        raise ConfigError("this run has no adapter (peft.method=none): write the full model instead")
    if pc.method in ("prompt", "prefix"):
        conf.update(num_layers=cfg.num_layers, num_transformer_submodules=1)
    conf.update(base_model_name_or_path=base, inference_mode=True, revision=None)
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)
    (directory / CONFIG).write_text(json.dumps(conf, indent=2) + "\n")
    return conf


def _lora_export(model, pc: PeftConfig, arch: str) -> tuple[dict, dict]:
    modules = _Modules(model.cfg, arch)
    found = _loras(model)
    if any(lora.merged for lora in found.values()):
        raise ConfigError("the LoRAs are merged into the weights: unmerge them before writing an adapter")
    groups: dict[str, dict[int, tuple]] = {}  # module -> {slot: (path, lora)}
    for path, lora in found.items():
        if path not in modules.of_path:
            raise ConfigError(f"{arch} has no tensor for the adapted weight {'.'.join(path)}")
        module, _, _, j = modules.of_path[path]
        groups.setdefault(module, {})[j] = (path, lora)
    tensors, ranks, alphas = {}, {}, {}
    for module, slots in groups.items():
        _, layers, paths, _ = modules.of_path[next(iter(slots.values()))[0]]
        name = modules.target(module)
        if isinstance(next(iter(slots.values()))[1], EmbeddingLoRA):
            lora = slots[0][1]
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = np.asarray(lora.a[...], np.float32).T
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = np.asarray(lora.b[...], np.float32).T
            continue
        n = len(slots)
        if n > 1:  # a fused tensor: its LoRA is the slots' block-diagonal one, of rank n·R at the same scale
            ranks[name] = n * pc.rank
            alphas[name] = pc.alpha * (math.sqrt(n) if pc.rslora else n)
        outs = [math.prod(_weight_shape(model, p, layers)[_in_dims(p) :]) for p in paths]
        for i in range(max(layers, 1)):
            a_rows, b = [], np.zeros((sum(outs), n * pc.rank), np.float32)
            for col, j in enumerate(sorted(slots)):
                lora = slots[j][1]
                a, bj = np.asarray(lora.a[...], np.float32), np.asarray(lora.b[...], np.float32)
                a, bj = (a[i], bj[i]) if layers else (a, bj)
                a_rows.append(a.reshape(-1, pc.rank).T)
                start = sum(outs[:j])
                b[start : start + outs[j], col * pc.rank : (col + 1) * pc.rank] = bj.reshape(pc.rank, -1).T
            where = PREFIX + (module.format(i) if layers else module)
            tensors[where + ".lora_A.weight"] = np.concatenate(a_rows)
            tensors[where + ".lora_B.weight"] = b
    conf = dict(peft_type="LORA", task_type=_task(model), r=pc.rank, lora_alpha=pc.alpha, use_rslora=pc.rslora)
    conf.update(lora_dropout=pc.dropout, target_modules=sorted({modules.target(m) for m in groups}))
    conf.update(rank_pattern=ranks, alpha_pattern=alphas, bias="none", use_dora=False, init_lora_weights=True)
    conf.update(fan_in_fan_out=arch == "GPT2LMHeadModel", modules_to_save=None)  # GPT-2's Conv1D stores (in, out)
    return tensors, conf


def _task(model) -> str | None:
    cfg = model.cfg
    return "SEQ_2_SEQ_LM" if cfg.decoder_layers else "CAUSAL_LM" if cfg.causal else None


# ---------------------------------------------------------------------------------------------- import


def load_adapter(model, directory: str | Path, *, arch: str, seed: int = 0, base_weights: bool = True) -> PeftConfig:
    """Applies the peft adapter in `directory` to `model` (a base from `from_hf` or a run; in place) and returns
    the PeftConfig that rebuilds it. ConfigError when the adapter does not fit the base (other shapes, modules
    the base lacks, features jaxlm does not implement).

    base_weights: a LoRA on the embeddings makes peft save the embedding and read-out weights too (in case
    the vocabulary was resized); True loads them into the model as peft does, False refuses them unless they
    equal the model's (an adapter-only run directory cannot hold them).
    """
    from jaxlm.hf.io import read_safetensors_file
    from jaxlm.peft import apply_peft

    directory = Path(directory)
    conf = read_adapter_config(directory)
    tensors = read_safetensors_file(directory / WEIGHTS)
    kind = conf["peft_type"]
    where = directory / CONFIG
    cfg = model.cfg
    if kind == "LORA":
        saved = {k: tensors.pop(k) for k in list(tensors) if k.endswith(".base_layer.weight")}
        _load_base_weights(model, saved, arch, where, replace=base_weights)
        pc, values = _lora_import(model, conf, tensors, arch, where)
        apply_peft(model, pc, seed=seed)
        found = _loras(model)
        for path, (a, b) in values.items():
            lora = found[path]
            lora.a.set_value(jnp.asarray(a, lora.a[...].dtype))
            lora.b.set_value(jnp.asarray(b, lora.b[...].dtype))
        return pc
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise ConfigError(f"{where}: peft_type {kind!r} is not supported (LORA, PROMPT_TUNING, PREFIX_TUNING)")
    if cfg.decoder_layers or not cfg.causal:
        raise ConfigError(f"{where}: prompt and prefix tuning are supported for decoder-only models")
    if conf.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"{where}: num_transformer_submodules must be 1 for a decoder-only model")
    x = tensors.get("prompt_embeddings")
    if x is None or set(tensors) != {"prompt_embeddings"}:
        raise ConfigError(f"{where}: expected exactly the tensor prompt_embeddings, found {sorted(tensors)}")
    P = int(conf.get("num_virtual_tokens", x.shape[0]))
    if kind == "PROMPT_TUNING":
        want, method = (P, cfg.d_model), "prompt"
    else:
        want, method = (P, cfg.num_layers * 2 * cfg.kv_heads * cfg.dim_per_head), "prefix"
    if tuple(x.shape) != want:
        raise ConfigError(
            f"{where}: prompt_embeddings has shape {tuple(x.shape)}, this base needs {want} "
            "(an adapter for a base of another shape)"
        )
    pc = PeftConfig(method=method, virtual_tokens=P)
    apply_peft(model, pc, seed=seed)
    target = model.prompt.embedding if method == "prompt" else model.stack.prefix.kv
    target.set_value(jnp.asarray(x, target[...].dtype))
    return pc


def _load_base_weights(model, saved: dict, arch: str, where, *, replace: bool) -> None:
    from jaxlm.hf.common import to_jax

    top, _ = family_layout(model.cfg, arch)
    table = {name: (target, layout) for name, target, layout in top}
    for key, x in saved.items():
        name = key[len(PREFIX) :].replace(".base_layer.weight", ".weight")
        if not key.startswith(PREFIX) or name not in table or not isinstance(table[name][0], tuple):
            raise ConfigError(f"{where}: tensor {key!r} is not a weight jaxlm reads")
        target, layout = table[name]
        owner = model
        for p in target[:-1]:
            owner = getattr(owner, p)
        param = getattr(owner, target[-1])
        value = np.asarray(to_jax(np.asarray(x, np.float32), layout, model.cfg))
        if value.shape != tuple(param[...].shape):
            raise ConfigError(
                f"{where}: {key} has shape {x.shape}; this base's {name} differs "
                "(an adapter for a base of another shape, or a resized vocabulary)"
            )
        if np.array_equal(value, np.asarray(param[...], np.float32)):
            continue
        if not replace:
            raise ConfigError(
                f"{where}: the adapter carries its own {name} (peft saves embedding weights with an embedding "
                "LoRA), and it differs from the base's: load it with jaxlm.hf.peft.load_adapter, or merge "
                "the adapter into the base with peft and convert the merged model"
            )
        param.set_value(jnp.asarray(value, param[...].dtype))


def _pattern(patterns: dict, module: str, default):
    """peft's rank/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def _lora_import(model, conf: dict, tensors: dict, arch: str, where) -> tuple[PeftConfig, dict]:
    for key, allowed in LORA_UNSUPPORTED.items():
        if conf.get(key) not in allowed:
            raise ConfigError(f"{where}: {key}={conf[key]!r} is not supported (jaxlm implements {allowed[0]!r})")
    modules = _Modules(model.cfg, arch)
    r, alpha, rslora = int(conf.get("r", 8)), float(conf.get("lora_alpha", 8)), bool(conf.get("use_rslora", False))
    pairs: dict[str, dict] = {}
    for key, x in tensors.items():
        m = re.fullmatch(
            r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", key
        )
        if m is None:
            raise ConfigError(f"{where}: tensor {key!r} is not a LoRA tensor jaxlm reads")
        pairs.setdefault(m.group(1), {})[m.group(2).split(".")[0].replace("embedding_", "")] = np.asarray(x, np.float32)
    per_path: dict[tuple, dict[int, tuple]] = {}  # weight path -> {layer: (A, B in jaxlm layout, scale)}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{where}: module {name} lacks {sorted({'lora_A', 'lora_B'} - set(ab))}")
        if name not in modules.named:
            raise ConfigError(f"{where}: the adapter adapts {name!r}, which this {arch} base does not have")
        module, layers, paths, i = modules.named[name]
        if not all(_role(p) for p in paths):
            raise ConfigError(
                f"{where}: the adapter adapts {name!r}, which jaxlm's LoRA does not target (it adapts the token "
                f"table, the read-out and the layers' projections: peft.targets from {', '.join(LORA_TARGETS)})"
            )
        A, B = ab["lora_A"], ab["lora_B"]
        rank = A.shape[0]
        scale = lora_scale(_pattern(conf.get("alpha_pattern"), name, alpha), rank, rslora)
        embedding = paths == [("embed", "embedding")]
        shapes = [_weight_shape(model, p, layers) for p in paths]
        if embedding:
            A, B = A.T, B.T  # (V, R), (R, D): jaxlm's EmbeddingLoRA layout
            ok = A.shape[0] == shapes[0][0] and B.shape == (rank, shapes[0][1])
            if not ok:
                raise ConfigError(
                    f"{where}: {name}'s LoRA has shapes {A.shape}, {B.shape}; this base's table is {shapes[0]}"
                )
            per_path.setdefault(paths[0], {})[i] = (A, B, scale)
            continue
        ks = [_in_dims(p) for p in paths]
        fan_in = math.prod(shapes[0][: ks[0]])
        outs = [math.prod(s[k:]) for s, k in zip(shapes, ks)]
        if A.shape[1] != fan_in or B.shape != (sum(outs), rank):
            raise ConfigError(
                f"{where}: {name}'s LoRA has shapes lora_A {A.shape}, lora_B {B.shape}; this base needs "
                f"({rank}, {fan_in}) and ({sum(outs)}, {rank}) (an adapter for a base of another shape)"
            )
        for j, p in enumerate(paths):
            rows = B[sum(outs[:j]) : sum(outs[: j + 1])]
            if len(paths) > 1 and not rows.any():
                continue  # this slot of a fused tensor is not adapted
            a = A.T.reshape(*shapes[j][: ks[j]], rank)
            b = rows.T.reshape(rank, *shapes[j][ks[j] :])
            per_path.setdefault(p, {})[i] = (a, b, scale)
    if not per_path:
        raise ConfigError(f"{where}: the adapter holds no LoRA tensors")
    # one rank and scale for every LoRA (what PeftConfig describes): pad ranks with zeros, fold scales into B
    R = max(a.shape[-1] for by_layer in per_path.values() for a, _, _ in by_layer.values())
    s0 = lora_scale(alpha, r, rslora)
    values = {}
    for path, by_layer in per_path.items():
        layers = modules.of_path[path][1]
        rows = []
        for i in range(max(layers, 1)):
            if i in by_layer:
                a, b, s = by_layer[i]
                pad = R - a.shape[-1]
                a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), a.dtype)], axis=-1)
                b = np.concatenate([b * (s / s0), np.zeros((pad, *b.shape[1:]), b.dtype)])
            else:  # a layer the adapter leaves alone (layers_to_transform)
                a0, b0, _ = next(iter(by_layer.values()))
                a = np.zeros((*a0.shape[:-1], R), np.float32)
                b = np.zeros((R, *b0.shape[1:]), np.float32)
            rows.append((a, b))
        values[path] = (np.stack([a for a, _ in rows]), np.stack([b for _, b in rows])) if layers else rows[0]
    roles = {_role(p) for p in per_path}
    targets = tuple(t for t in LORA_TARGETS if t in roles)
    pc = PeftConfig(
        method="lora",
        rank=R,
        alpha=alpha if R == r else s0 * (math.sqrt(R) if rslora else R),
        rslora=rslora,
        dropout=float(conf.get("lora_dropout", 0.0)),
        targets=targets,
    )
    return pc, values  # weights of a targeted role the adapter leaves alone keep B = 0 (no update)


def _role(path: tuple) -> str | None:
    """The peft.targets entry that adapts the weight at `path`, or None if jaxlm's LoRA cannot adapt it."""
    if path == ("embed", "embedding"):
        return "embed"
    return "lm_head" if path == ("lm_head",) else ROLES.get(path[-1]) if len(path) > 1 else None


def _in_dims(path: tuple) -> int:
    from jaxlm.peft import PROJECTIONS

    if path == ("lm_head",):
        return 1
    by_weight = {name: len(in_axes) for _, name, in_axes, _ in PROJECTIONS.values()}
    return by_weight.get(path[-1], by_weight["w_up"] if path[-1] == "w_in" else 1)
