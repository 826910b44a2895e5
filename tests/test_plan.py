import re

import pytest

from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.nn.models import count_params
from jaxlm.plan import plan

GiB = 1024**3


def memory(report: str) -> dict[str, float]:
    units = {"GiB": GiB, "MiB": 1024**2, "KiB": 1024, "B": 1}
    out = {}
    for name, value, unit in re.findall(r"^  (\w[\w ]*?)\s+([\d.]+) (GiB|MiB|KiB|B)", report, re.M):
        out[name] = float(value) * units[unit]
    return out


def test_llama2_7b_fsdp8_splits_every_matrix_eight_ways():
    cfg = load_config("configs/llama2_7b.yaml")
    report = plan(cfg, 8)
    params = count_params(cfg.model)
    mem = memory(report)
    # fp32 parameters over 8 devices; AdamW keeps two moments.
    assert mem["parameters"] == pytest.approx(params * 4 / 8, rel=1e-3)
    assert mem["optimizer state"] == pytest.approx(2 * params * 4 / 8, rel=1e-3)
    assert mem["activations"] > 0 and "fsdp=8" in report
    assert re.search(r"layers\.mlp\.w_up\s+\(32, 4096, 11008\)\s+layers, embed, mlp\s+\(None, fsdp, None\)", report)


def test_plan_tensor_parallel_and_zero1():
    cfg = load_config("configs/llama3_8b.yaml", ["mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=1"])
    report = plan(cfg, 8)
    mem = memory(report)
    params = count_params(cfg.model)
    # ZeRO-1: parameters split over tensor only, optimizer state also over fsdp.
    assert mem["parameters"] == pytest.approx(params * 4 / 2, rel=1e-2)
    assert mem["optimizer state"] == pytest.approx(2 * params * 4 / 8, rel=1e-2)
    assert "layers.attn.wk" in report and "(None, None, tensor, None)" in report


def test_remat_lowers_the_activation_estimate():
    acts = {
        r: memory(plan(load_config("configs/llama2_7b.yaml", [f"model.remat={r}"]), 8))["activations"]
        for r in ("none", "save_dots", "full")
    }
    assert acts["none"] > acts["save_dots"] > acts["full"]


def test_plan_rejects_a_mesh_that_does_not_fit():
    with pytest.raises(ConfigError, match="needs 16 devices"):
        plan(load_config("configs/llama2_7b.yaml", ["mesh.fsdp=16"]), 8)


def test_cli_plan(capsys):
    assert main(["plan", "configs/llama_tiny.yaml", "--devices", "4", "mesh.data=2", "mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "data=2 x tensor=2" in out and "memory per device" in out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_plan_estimate_against_the_compiled_step(remat):
    """`plan --compiled`: the state bytes match XLA's arguments exactly; the estimate is within 30% of the peak."""
    from jaxlm.plan import compiled_memory
    from tests.conftest import TINY

    cfg = load_config("configs/llama_tiny.yaml", TINY + [f"model.remat={remat}", "train.batch_size=16"])
    report = plan(cfg, 1, compiled=True)
    mem = memory(report)
    compiled = compiled_memory(cfg)
    assert mem["peak"] == pytest.approx(compiled["peak"], rel=1e-2)
    state = mem["parameters"] + mem["optimizer state"]
    assert compiled["arguments"] == pytest.approx(state, rel=0.02)  # plus the token batch
    assert abs(mem["total"] - compiled["peak"]) / compiled["peak"] < 0.3, report
    assert "of the compiled peak" in report


def test_plan_compiled_needs_the_devices(capsys):
    assert main(["plan", "configs/llama_tiny.yaml", "mesh.data=16", "--devices", "16", "--compiled"]) == 2
    assert "plan --compiled compiles on the devices present" in capsys.readouterr().err


def test_plan_learned_positions():  # a parameter with an unsplit axis (None) prints
    assert "positions.embedding" in plan(load_config("configs/gpt_tiny.yaml"), 1)


def test_mixtral_on_8_devices_splits_the_experts():
    """The Mixtral preset with its experts over mesh.expert=8: one expert of each layer a device, every other
    parameter sharded over the same devices (ZeRO-3 over fsdp x expert), the all-to-all traffic reported."""
    cfg = load_config("configs/mixtral_8x7b.yaml", ["mesh.expert=8", "mesh.fsdp=1"])
    report = plan(cfg, 8)
    params = count_params(cfg.model)
    mem = memory(report)
    assert mem["parameters"] == pytest.approx(params * 4 / 8, rel=1e-3)  # 46.7B fp32 over 8 devices
    assert mem["optimizer state"] == pytest.approx(2 * params * 4 / 8, rel=1e-3)
    assert re.search(
        r"layers\.moe\.w_gate\s+\(32, 8, 4096, 14336\)\s+layers, experts, embed, mlp\s+\(None, expert,", report
    )
    assert re.search(
        r"layers\.attn\.wq\s+\(32, 4096, 32, 128\)\s+layers, embed, heads, head_dim\s+\(None, expert,", report
    )
    assert "12.88 B parameters active a token" in report
    assert re.search(r"1 of 8 experts a device \(expert=8\); all-to-all [\d.]+ MiB a layer each way", report)
