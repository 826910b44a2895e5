"""`jaxlm serve BASE --adapter NAME=DIR ...`: several LoRA adapters served on one base, in one continuous
batch; a request's `model` picks its adapter by name (the base by its own).

An adapter is a Hugging Face peft LoRA directory (adapter_config.json + adapter_model.safetensors) or a jaxlm
LoRA run (a `peft.method: lora` or `qlora` run over the same base). Their LoRAs become banks on the base's
weights (`jaxlm.peft.attach_lora_banks`): each row of a step computes its own adapter's update, so a request
gets what that adapter alone would give (a QLoRA run's adapter is applied to the full-precision base, as
peft serves one after training)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError, DataError
from jaxlm.nn.adapters import Adapter
from jaxlm.peft import attach_lora_banks, loras, take_loras

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def parse_adapter(spec: str) -> tuple[str, str]:
    """ "NAME=DIR" -> (name, dir); ConfigError naming what is wrong."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR (a peft LoRA directory or a jaxlm LoRA run)")
    if not NAME.fullmatch(name):
        raise ConfigError(f"--adapter {spec!r}: the name {name!r} must be letters, digits and . _ : / - only")
    return name, path


def attach_adapters(served, specs: list[str]) -> None:
    """Reads every "NAME=DIR" of `specs` and serves them with `served`'s model (in place: its weights gain the
    banks, `served.adapters` their names); ConfigError or DataError, naming the adapter, when one does not fit."""
    from jaxlm.hf.families import architecture_for
    from jaxlm.hf.peft import is_adapter_dir, load_adapter, read_adapter_config
    from jaxlm.train.run_dir import load_model_dir

    model, names, values = served.model, [], []
    if loras(model) or model.virtual_tokens:
        raise ConfigError(
            f"--adapter: {served.name} carries adapters itself; serve its base with --adapter, or a merged export "
            "(`jaxlm convert --to-hf RUN --merge`)"
        )
    for spec in specs:
        name, path = parse_adapter(spec)
        if name == served.name or name in names:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is already served")
        where = Path(path).expanduser()
        if is_adapter_dir(where):
            kind = read_adapter_config(where)["peft_type"]
            if kind != "LORA":
                raise ConfigError(f"--adapter {name}: {where} is a {kind} adapter; multi-adapter serving takes LoRA")
            try:
                load_adapter(model, where, arch=architecture_for(model.cfg), base_weights=False)
            finally:
                values.append(take_loras(model))  # the base stays as it was, even when the adapter is refused
        elif (where / "config.yaml").is_file():
            run = load_model_dir(where, what=f"--adapter {name}", generates=True)
            if run.cfg.peft.method not in ("lora", "qlora"):
                raise ConfigError(
                    f"--adapter {name}: {where} is a peft.method={run.cfg.peft.method} run; multi-adapter serving "
                    "takes LoRA (peft.method lora or qlora)"
                )
            _check_base(run.model, model, f"--adapter {name}: {where}", served.name)
            values.append(take_loras(run.model))
        elif not where.exists():
            raise DataError(f"--adapter {name}: {where} does not exist")
        else:
            raise DataError(
                f"--adapter {name}: {where} has neither adapter_config.json (a peft LoRA) nor config.yaml (a jaxlm run)"
            )
        if not values[-1]:
            raise ConfigError(f"--adapter {name}: {where} holds no LoRA weights")
        names.append(name)
    if values:
        attach_lora_banks(model, values)
    served.adapters = tuple(names)


def _check_base(run_model, base, what: str, base_name: str) -> None:
    """ConfigError unless the run's frozen weights are the served base's (its NF4 weights aside: QLoRA)."""
    frozen = nnx.All(nnx.Param, nnx.Not(Adapter))
    ours = dict(nnx.to_flat_state(nnx.state(base, frozen)))
    for path, v in nnx.to_flat_state(nnx.state(run_model, frozen)):
        mine = ours.get(path)
        if mine is None or mine.shape != v.shape or not np.array_equal(np.asarray(mine[...]), np.asarray(v[...])):
            raise ConfigError(
                f"{what} was trained on another base than {base_name}: its {'.'.join(map(str, path))} differs"
            )
