"""`from_hf(path)` and `to_hf(model, path)`: Hugging Face model directories <-> jaxlm.

A directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and usually `tokenizer.json`. Reading maps
every config key and every tensor or fails naming what it cannot map; writing
produces a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.data.tokenizer import BPETokenizer, DataError
from jaxlm.hf.families import architecture_for, config_from_hf, config_to_hf
from jaxlm.hf.weights import hf_to_params, params_to_hf
from jaxlm.nn.models import build_model

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards its index lists, as NumPy (bf16 via ml_dtypes)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not files:
            raise DataError(f"{index} lists no tensors")
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise DataError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise DataError(f"shard {path} listed in the index is missing")
        tensors.update(read_safetensors_file(path))
    return tensors


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file; DataError naming the file when it is missing or corrupt."""
    from safetensors import safe_open

    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        with safe_open(str(path), framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError for truncated or corrupt files
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _eos_id(directory: Path, hf: dict, tok) -> int | None:
    for source in (hf, _maybe_json(directory / "generation_config.json")):
        eos = source.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    name = _maybe_json(directory / "tokenizer_config.json").get("eos_token")
    if isinstance(name, dict):
        name = name.get("content")
    for candidate in (name, "</s>", "<|endoftext|>", "[SEP]"):  # [SEP] ends BERT's sequences
        if candidate and tok.token_to_id(candidate) is not None:
            return tok.token_to_id(candidate)
    return None


def _chat_settings(directory: Path) -> tuple[str | None, dict]:
    """The chat template (tokenizer_config.json, or chat_template.jinja beside it) and its special-token strings."""
    conf = _maybe_json(directory / "tokenizer_config.json")
    template = conf.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = conf.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    return template, special


def _maybe_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def from_hf(path: str | Path, *, dtype: str = "float32", param_dtype: str = "float32"):
    """Loads a Hugging Face model directory: returns (TransformerLM, tokenizer or None, architecture)."""
    t = time.perf_counter()
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"Hugging Face model directory not found: {directory}")
    hf = _read_json(directory / "config.json")
    if "bfloat16" in (dtype, param_dtype) and jax.default_backend() == "cpu":  # measured: ~10x slower decoding
        log.warning(
            "bfloat16 on the CPU: XLA:CPU has no fast bfloat16 matmul, so this decodes several times slower than "
            "float32; for bfloat16 weights on a CPU load float32 and use jaxlm.quantize.store_weights(model, "
            "'bf16') (`--weights bf16`), whose kernels convert in registers"
        )
    model, arch = model_from_tensors(hf, read_safetensors(directory), dtype=dtype, param_dtype=param_dtype)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
        template, special = _chat_settings(directory)
        tokenizer = BPETokenizer(raw, _eos_id(directory, hf, raw), chat_template=template, special_tokens=special)
    else:
        log.warning("%s has no tokenizer.json; returning the model alone", directory)
    log.info("loaded %s from %s in %.1f s", arch, directory, time.perf_counter() - t)
    return model, tokenizer, arch


def model_from_tensors(hf: dict, tensors: dict, *, dtype: str = "float32", param_dtype: str = "float32"):
    """(model, architecture) from a config.json dict and {Hugging Face tensor name: array}; ConfigError or
    DataError names any key or tensor that cannot be mapped."""
    cfg, arch = config_from_hf(hf, tensors)
    cfg = ModelConfig(**{**cfg.__dict__, "dtype": dtype, "param_dtype": param_dtype})
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    expected = {p: tuple(v.shape) for p, v in flat.items()}
    params = hf_to_params(tensors, cfg, arch, expected)
    for p, v in flat.items():
        v.set_value(jnp.asarray(params[p], v.dtype))
    return nnx.merge(graphdef, state), arch


def model_params(model: nnx.Module) -> dict:
    """{param path: NumPy array} of a model."""
    return {p: np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_hf(model: nnx.Module, path: str | Path, *, tokenizer=None, architecture: str | None = None) -> str:
    """Writes config.json, model.safetensors (and tokenizer.json) for `model`; returns the architecture.

    architecture: the HF class to write (it must compute the same function), default the first family that
    can (LLaMA before Phi-3, which can hold the same model).
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    arch = architecture_for(cfg, architecture)
    if cfg.value_head:  # PPO's critic: transformers' causal classes have no place for it
        log.warning("%s has no value head: model.value_head (PPO's critic) is not written", arch)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    eos = None if tokenizer is None else int(tokenizer.eos_id)
    hf = config_to_hf(cfg, arch, bos_id=eos, eos_id=eos)
    hf["torch_dtype"] = cfg.param_dtype
    tensors = params_to_hf(model_params(model), cfg, arch)
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # never leaves a half-written checkpoint under the real name
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "_tok"):
        tokenizer._tok.save(str(directory / "tokenizer.json"))
        conf = dict(getattr(tokenizer, "special_tokens", {}))
        if getattr(tokenizer, "chat_template", None):
            conf["chat_template"] = tokenizer.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    return arch
