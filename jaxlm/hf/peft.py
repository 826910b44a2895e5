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

A mixture's experts (`ExpertLoRA`, one LoRA per expert) are the parameters transformers keeps fused in each
layer's `mlp.experts` module: `gate_up_proj` and `down_proj`, (E, ...) 3-D tensors that peft adapts through
`target_parameters` (its `ParamWrapper`: one LoRA per expert, `lora_A` (E·R, in) with expert e's rows at
e·R..e·R+R, `lora_B` (out, R·E) with expert e's columns at e, E+e, ...). Two adapted parameters of one module
nest: the one transformers defines first (gate_up_proj) is the inner `experts.base_layer`. gate and up share
gate_up_proj as q and v share GPT-2's c_attn (block-diagonal, rank 2R).
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
from jaxlm.hf.families import family_of, lm_architecture
from jaxlm.hf.families import layout as family_layout
from jaxlm.hf.weights import _paths
from jaxlm.nn.adapters import EmbeddingLoRA, ExpertLoRA, LoRA
from jaxlm.nn.quantized import QuantizedWeight
from jaxlm.ops.lora import lora_scale

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPERTS = "model.layers.{}.mlp.experts"  # transformers' fused experts of a layer (every MoE family)
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # its adapted parameters, in the order the module defines them
# jaxlm weight attribute -> LoRA target role (jaxlm.peft.PROJECTIONS read backwards)
ROLES = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w_gate": "gate", "w_up": "up", "w_in": "up", "w_out": "down"}
# adapter_config.json entries that change what a LoRA computes, and the values jaxlm implements
LORA_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
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
            if not name.endswith(".weight") or "{e}" in name:  # per-expert tensors: see EXPERTS
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
    experts = {path[-1]: lora for path, lora in found.items() if isinstance(lora, ExpertLoRA)}
    tensors, targets, ranks, alphas = _expert_export(experts, pc, arch)
    groups: dict[str, dict[int, tuple]] = {}  # module -> {slot: (path, lora)}
    for path, lora in found.items():
        if isinstance(lora, ExpertLoRA):
            continue
        if path not in modules.of_path:
            raise ConfigError(f"{arch} has no tensor for the adapted weight {'.'.join(path)}")
        module, _, _, j = modules.of_path[path]
        groups.setdefault(module, {})[j] = (path, lora)
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
    conf.update(target_parameters=targets or None)
    conf.update(rank_pattern=ranks, alpha_pattern=alphas, bias="none", use_dora=False, init_lora_weights=True)
    conf.update(fan_in_fan_out=arch == "GPT2LMHeadModel", modules_to_save=None)  # GPT-2's Conv1D stores (in, out)
    return tensors, conf


def _fused_experts(arch: str) -> str | None:
    """How `arch`'s fused gate_up_proj holds gate and up (the family's PEFT_EXPERTS), or None."""
    return getattr(family_of(lm_architecture(arch)), "PEFT_EXPERTS", None)


def _gate_up_rows(fused: str, F: int) -> dict[str, slice]:
    """Rows of gate_up_proj's output (2F) that the gate and the up projection fill."""
    if fused == "interleaved":
        return {"w_gate": slice(0, 2 * F, 2), "w_up": slice(1, 2 * F, 2)}
    return {"w_gate": slice(0, F), "w_up": slice(F, 2 * F)}


def _expert_export(experts: dict, pc: PeftConfig, arch: str) -> tuple[dict, list, dict, dict]:
    """The experts' LoRAs ({weight name: ExpertLoRA}) as peft's LoRAs of the fused expert parameters:
    (tensors, target_parameters, rank_pattern, alpha_pattern)."""
    if not experts:
        return {}, [], {}, {}
    fused = _fused_experts(arch)
    if fused is None or "w_in" in experts:
        raise ConfigError(
            f"{arch} has no fused gated experts for peft to adapt (per-expert LoRA exports to the families with "
            "`mlp.experts`: Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss): write the merged model "
            "(`jaxlm convert --to-hf RUN --merge`)"
        )
    arrays = {
        n: (np.asarray(lora.a[...], np.float32), np.asarray(lora.b[...], np.float32)) for n, lora in experts.items()
    }
    slots = [n for n in ("w_gate", "w_up") if n in arrays]
    params = (["gate_up_proj"] if slots else []) + (["down_proj"] if "w_out" in arrays else [])
    L, E, _, R = next(iter(arrays.values()))[0].shape
    tensors, ranks, alphas = {}, {}, {}
    if len(slots) > 1:  # gate and up share gate_up_proj: a block-diagonal LoRA of rank 2R at the same scale
        ranks["mlp.experts.gate_up_proj"] = 2 * pc.rank
        alphas["mlp.experts.gate_up_proj"] = pc.alpha * (math.sqrt(2) if pc.rslora else 2)
    for i in range(L):
        for depth, param in enumerate(reversed(params)):  # the last adapted parameter is the outer wrapper
            if param == "down_proj":
                a, b = (x[i] for x in arrays["w_out"])  # (E, F, R), (E, R, D)
                A, B = a.transpose(0, 2, 1), b.transpose(2, 1, 0)  # (E, R, in), (out, R, E)
            else:
                F = arrays[slots[0]][1].shape[-1]
                rows = _gate_up_rows(fused, F)
                A = np.concatenate([arrays[n][0][i].transpose(0, 2, 1) for n in slots], axis=1)
                B = np.zeros((2 * F, len(slots) * R, E), np.float32)
                for s, n in enumerate(slots):
                    B[rows[n], s * R : (s + 1) * R] = arrays[n][1][i].transpose(2, 1, 0)
            where = PREFIX + EXPERTS.format(i) + ".base_layer" * depth
            tensors[where + ".lora_A.weight"] = A.reshape(-1, A.shape[-1])
            tensors[where + ".lora_B.weight"] = B.reshape(B.shape[0], -1)
    return tensors, ["mlp.experts." + p for p in params], ranks, alphas


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
    per_path = _expert_import(model, conf, tensors, arch, where, alpha, rslora)  # takes the experts' tensors
    pairs: dict[str, dict] = {}
    for key, x in tensors.items():
        m = re.fullmatch(
            r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", key
        )
        if m is None:
            raise ConfigError(f"{where}: tensor {key!r} is not a LoRA tensor jaxlm reads")
        pairs.setdefault(m.group(1), {})[m.group(2).split(".")[0].replace("embedding_", "")] = np.asarray(x, np.float32)
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
        expert = path[-2:-1] == ("moe",)  # A (E, I, R), B (E, R, O): the rank is B's axis 1, not 0
        layers = modules.of_path[path][1] if not expert else model.cfg.num_layers
        ax = 1 if expert else 0
        rows = []
        for i in range(max(layers, 1)):
            if i in by_layer:
                a, b, s = by_layer[i]
                a, b = _pad_rank(a, -1, R), _pad_rank(b * (s / s0), ax, R)
            else:  # a layer the adapter leaves alone (layers_to_transform)
                a0, b0, _ = next(iter(by_layer.values()))
                a, b = _pad_rank(0 * a0, -1, R), _pad_rank(0 * b0, ax, R)
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


def _pad_rank(x: np.ndarray, axis: int, R: int) -> np.ndarray:
    """x with zeros appended along its rank axis up to R."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, R - x.shape[axis])
    return np.pad(x, pad)


def _expert_import(model, conf: dict, tensors: dict, arch: str, where, alpha: float, rslora: bool) -> dict:
    """peft's LoRAs of the fused expert parameters (`target_parameters`), taken out of `tensors`, as
    {jaxlm weight path: {layer: (A (E, I, R), B (E, R, O), scale)}}."""
    targets = conf.get("target_parameters") or []
    if not targets:
        return {}
    fused = _fused_experts(arch)
    params = [
        p for p in EXPERT_PARAMS if any(t == "mlp.experts." + p or t.endswith(".mlp.experts." + p) for t in targets)
    ]
    unknown = [t for t in targets if not t.endswith(tuple("mlp.experts." + p for p in EXPERT_PARAMS))]
    if fused is None or unknown or not params:
        raise ConfigError(
            f"{where}: target_parameters {unknown or targets} are not parameters jaxlm adapts (it adapts the fused "
            "experts' mlp.experts.gate_up_proj and mlp.experts.down_proj of Mixtral, Qwen-MoE, DeepSeek-V3 and "
            "gpt-oss)"
        )
    cfg = model.cfg
    E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_hidden
    pattern = re.compile(
        r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)\.lora_([AB])\.weight"
    )
    found: dict[tuple, dict] = {}  # (layer, parameter) -> {"A": .., "B": ..}
    for key in [k for k in tensors if pattern.fullmatch(k)]:
        m = pattern.fullmatch(key)
        depth = m.group(2).count(".base_layer")
        if depth >= len(params):
            raise ConfigError(f"{where}: tensor {key!r} nests deeper than its {len(params)} target_parameters")
        found.setdefault((int(m.group(1)), params[-1 - depth]), {})[m.group(3)] = np.asarray(
            tensors.pop(key), np.float32
        )
    per_path: dict[tuple, dict[int, tuple]] = {}
    for (i, param), ab in sorted(found.items()):
        name = f"{EXPERTS.format(i)}.{param}"
        if set(ab) != {"A", "B"} or i >= cfg.num_layers:
            raise ConfigError(f"{where}: {name} has no LoRA pair this base can take (layer {i}, {sorted(ab)})")
        A, B = ab["A"], ab["B"]
        fan_in, out = (D, 2 * F) if param == "gate_up_proj" else (F, D)
        rank = A.shape[0] // E
        if A.shape != (rank * E, fan_in) or B.shape != (out, rank * E) or rank == 0:
            raise ConfigError(
                f"{where}: {name}'s LoRA has shapes lora_A {A.shape}, lora_B {B.shape}; this base's {E} experts "
                f"need (R·{E}, {fan_in}) and ({out}, R·{E}) (an adapter for a base of another shape)"
            )
        scale = lora_scale(_pattern(conf.get("alpha_pattern"), name, alpha), rank, rslora)
        a = A.reshape(E, rank, fan_in).transpose(0, 2, 1)  # (E, I, R)
        b = B.reshape(out, rank, E).transpose(2, 1, 0)  # (E, R, out)
        if param == "down_proj":
            per_path.setdefault(("stack", "layers", "moe", "w_out"), {})[i] = (a, b, scale)
            continue
        for n, rows in _gate_up_rows(fused, F).items():  # gate and up: the shared A, each its rows of B
            per_path.setdefault(("stack", "layers", "moe", n), {})[i] = (a, b[..., rows], scale)
    return per_path


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
