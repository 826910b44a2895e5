"""Per-expert LoRA against Hugging Face peft: transformers keeps a layer's experts fused (`mlp.experts`'s 3-D
gate_up_proj and down_proj) and peft adapts them through `target_parameters`. Both directions give the same
logits as peft on the same base, for the concatenated (Mixtral, Qwen3-MoE) and interleaved (gpt-oss) gate_up."""

import copy
import json

import numpy as np
import pytest

from jaxlm.config import ConfigError, PeftConfig
from jaxlm.hf import from_hf
from jaxlm.hf.peft import load_adapter, save_adapter
from jaxlm.peft import apply_peft
from tests.hf.test_decoder_parity import hf_model
from tests.hf.test_peft_parity import jax_logits, randomize, torch_logits
from tests.parity import require

torch = require("torch")
peft = require("peft")

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "gpt_oss"])
def base(request, tmp_path_factory):
    """(case, torch model, base directory, ids)."""
    path = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param, path)
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    return request.param, model, path, ids


@pytest.mark.parametrize(
    "targets, rslora",
    [(("q", "gate", "up", "down"), False), (("up",), True), (("o", "down"), False)],
    ids=["attention+experts", "up-only-rslora", "down-only"],
)
def test_jaxlm_expert_adapter_loads_into_peft(base, targets, rslora, tmp_path):
    case, torch_model, path, ids = base
    model, _, arch = from_hf(path)
    pc = PeftConfig(method="lora", rank=3, alpha=5.0, rslora=rslora, targets=targets)
    apply_peft(model, pc, seed=0)
    randomize(model, 2)
    conf = save_adapter(model, tmp_path / "out", pc, arch=arch, base=str(path))
    adapted = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
    assert conf["target_parameters"] == [p for p in EXPERT_PARAMS if p.split(".")[-1] in map(adapted.get, targets)]
    if {"gate", "up"} <= set(targets):  # gate and up share gate_up_proj: rank 2R, the same scale
        assert conf["rank_pattern"] == {"mlp.experts.gate_up_proj": 6}
    got = jax_logits(model, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "out").eval()
    want = torch_logits(pm, ids)
    assert np.abs(want - torch_logits(torch_model, ids)).max() > 1e-2  # the adapter changes the function
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    again, _, _ = from_hf(path)  # and back: our own export reads back as the same model
    load_adapter(again, tmp_path / "out", arch=arch)
    np.testing.assert_allclose(jax_logits(again, ids), got, atol=1e-5)


def test_peft_expert_adapter_loads_into_jaxlm(base, tmp_path):
    case, torch_model, path, ids = base
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, init_lora_weights=False
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(torch_model), lora).eval()
    pm.save_pretrained(tmp_path / "a")
    want = torch_logits(pm, ids)
    model, _, arch = from_hf(path)
    pc = load_adapter(model, tmp_path / "a", arch=arch)
    assert set(pc.targets) == {"q", "gate", "up", "down"}
    assert np.abs(want - torch_logits(torch_model, ids)).max() > 1e-2
    np.testing.assert_allclose(jax_logits(model, ids), want, atol=1e-4, rtol=1e-4)


def test_an_expert_parameter_jaxlm_does_not_adapt_is_named(base, tmp_path):
    case, torch_model, path, _ = base
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS[-1:])
    peft.get_peft_model(copy.deepcopy(torch_model), lora).save_pretrained(tmp_path / "a")
    conf_path = tmp_path / "a" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "target_parameters": ["mlp.gate.weight"]}))
    model, _, arch = from_hf(path)
    with pytest.raises(ConfigError, match=r"mlp\.gate\.weight"):
        load_adapter(model, tmp_path / "a", arch=arch)


def test_plain_experts_have_no_peft_format(tmp_path):
    """A jaxlm mixture of plain (ungated) experts has no Hugging Face family with fused experts: named."""
    from flax import nnx

    from jaxlm.config import ModelConfig
    from jaxlm.nn.models import build_model

    cfg = ModelConfig(
        vocab_size=64, d_model=32, num_layers=1, num_heads=4, mlp_dim=48, max_seq_len=32, num_experts=4, mlp="plain"
    )
    model = build_model(cfg, rngs=nnx.Rngs(0))
    pc = PeftConfig(method="lora", rank=2, targets=("up",))
    apply_peft(model, pc)
    with pytest.raises(ConfigError, match="merge"):
        save_adapter(model, tmp_path / "a", pc, arch="MixtralForCausalLM")
