"""Configs to and from YAML: nested dicts checked key by key against the dataclasses, dotted overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxlm.config.model import ModelConfig, get_preset
from jaxlm.config.run import Config
from jaxlm.errors import ConfigError
from jaxlm.presets import PRESET_FIELDS


def from_dict(cls, data: Any, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Config and f.name == "given")}
    hints = typing.get_type_hints(cls)
    data = dict(data)
    base = None
    if cls is ModelConfig and "preset" in data:
        base = get_preset(data.pop("preset"))
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names}; valid keys under {where}: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, key)
        else:
            values[name] = _coerce(key, value, hint)
    if cls is Config:  # what the config sets itself (a preset: the fields it names)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        keys = [f"{s}.{k}" for s, sub in data.items() if isinstance(sub, dict) for k in sub if k != "preset"]
        keys += [f"model.{k}" for k in PRESET_FIELDS.get(model.get("preset"), ())]  # what the preset names
        values["given"] = frozenset(keys)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {e}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)) and dataclasses.is_dataclass(item):
            return tuple(from_dict(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
        raise ConfigError(f"{key} must be a list of {item.__name__}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


def parse_overrides(overrides: list[str]) -> dict:
    """["model.num_layers=4", ...] -> nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML config (or defaults when path is None) and applies overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping with model/data/train sections")
    data = _merge(data, parse_overrides(list(overrides)))
    return from_dict(Config, data)


def to_dict(config) -> dict:
    """Nested plain dict (tuples as lists, as YAML writes them); `Config.given` is not part of it."""
    out = dataclasses.asdict(
        config, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
    )
    if isinstance(config, Config):
        del out["given"]
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
