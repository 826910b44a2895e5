"""jaxlm adapters against Hugging Face peft (torch CPU): LoRA, prompt and prefix tuning, both directions.

A small random transformers model is saved and loaded with `jaxlm.from_hf`. peft -> jaxlm: a peft model with
random (non-zero) adapter weights is saved with `save_pretrained` and read by `load_adapter`. jaxlm -> peft:
a jaxlm adapter with random weights is written by `save_adapter` and read by `PeftModel.from_pretrained`.
Both sides then give the same logits.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, PeftConfig
from jaxlm.hf import from_hf
from jaxlm.hf.peft import load_adapter, save_adapter
from jaxlm.nn.adapters import Adapter
from jaxlm.peft import apply_peft
from tests.parity import require

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

VOCAB, T = 96, 10
BASES = {
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ),
}
LORA_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "wte"],
}
JAXLM_TARGETS = {
    "llama": ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"),
    "gpt2": ("q", "v", "o", "up", "down", "embed"),  # q and v without k: two of c_attn's three blocks
}


@pytest.fixture(scope="module", params=sorted(BASES))
def base(request, tmp_path_factory):
    """(family, torch model, base directory, ids)."""
    torch.manual_seed(0)
    model = BASES[request.param]().eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, T))
    return request.param, model, path, ids


def ours(path):
    model, _, arch = from_hf(path)
    return model, arch


def jax_logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids))[0])


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def randomize(model, seed: int) -> None:
    """Every adapter parameter drawn from N(0, 0.3^2): B = 0 would hide layout mistakes."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    for _, v in nnx.to_flat_state(nnx.state(model, Adapter)):
        v.set_value(0.3 * jax.random.normal(next(keys), v[...].shape, v[...].dtype))


PEFT_CONFIGS = {
    "lora": lambda fam: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_MODULES[fam], init_lora_weights=False, lora_dropout=0.0
    ),
    "lora_patterns": lambda fam: peft.LoraConfig(  # per-module ranks and alphas, rsLoRA
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=LORA_MODULES[fam][:4],
        rank_pattern={LORA_MODULES[fam][0]: 6},
        alpha_pattern={LORA_MODULES[fam][1]: 3},
        init_lora_weights=False,
    ),
    "prompt": lambda fam: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda fam: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_mlp": lambda fam: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    ),
}


def peft_logits(pm, ids, method: str) -> np.ndarray:
    logits = torch_logits(pm, ids)
    return logits[:, -T:] if method.startswith("prompt") else logits  # prompt tuning returns the virtual rows


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
def test_peft_adapter_loads_into_jaxlm(base, method, tmp_path):
    fam, torch_model, path, ids = base
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(torch_model), PEFT_CONFIGS[method](fam)).eval()
    if method.startswith(("prompt", "prefix")):  # peft draws these at random already; move them off the init
        for p in pm.prompt_encoder.parameters():
            p.data.normal_(0.0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    model, arch = ours(path)
    base_logits = jax_logits(model, ids)
    pc = load_adapter(model, tmp_path / "adapter", arch=arch)
    assert pc.method == method.split("_")[0]
    got = jax_logits(model, ids)
    want = peft_logits(pm, ids, method)
    assert np.abs(want - base_logits).max() > 1e-2  # the adapter changes the function
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "lora_rslora", "prompt", "prefix"])
def test_jaxlm_adapter_loads_into_peft(base, method, tmp_path):
    fam, torch_model, path, ids = base
    model, arch = ours(path)
    if method.startswith("lora"):
        pc = PeftConfig(method="lora", rank=3, alpha=5.0, rslora=method == "lora_rslora", targets=JAXLM_TARGETS[fam])
    else:
        pc = PeftConfig(method=method, virtual_tokens=4)
    apply_peft(model, pc, seed=0)
    randomize(model, 2)
    conf = save_adapter(model, tmp_path / "out", pc, arch=arch, base=str(path))
    got = jax_logits(model, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "out").eval()
    want = torch_logits(pm, ids)
    want = want[:, -T:] if method == "prompt" else want
    assert np.abs(want - torch_logits(torch_model, ids)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    if fam == "gpt2" and method.startswith("lora"):  # q and v share c_attn: a block-diagonal LoRA of rank 2R
        assert conf["rank_pattern"] == {"attn.c_attn": 6} and conf["fan_in_fan_out"] is True
    # and back: reading our own export gives the same model
    again, _ = ours(path)
    load_adapter(again, tmp_path / "out", arch=arch)
    np.testing.assert_allclose(jax_logits(again, ids), got, atol=1e-5)


def test_adapter_for_another_base_is_refused(base, tmp_path):
    fam, torch_model, path, _ = base
    cfg = torch_model.config.to_dict()
    wider = copy.deepcopy(torch_model.config)
    key = "hidden_size" if fam == "llama" else "n_embd"
    setattr(wider, key, cfg[key] * 2)
    if fam == "llama":
        wider.head_dim = cfg["head_dim"] * 2
    other = type(torch_model)(wider)
    other.save_pretrained(tmp_path / "wide")
    for name, pc in (
        ("lora", PeftConfig(method="lora", rank=2)),
        ("prefix", PeftConfig(method="prefix", virtual_tokens=2)),
    ):
        model, arch = ours(path)
        if fam == "gpt2" and name == "lora":
            pc = PeftConfig(method="lora", rank=2, targets=("q", "o"))
        apply_peft(model, pc)
        save_adapter(model, tmp_path / name, pc, arch=arch)
        wide, _ = ours(tmp_path / "wide")
        with pytest.raises(ConfigError, match="another shape|this base"):
            load_adapter(wide, tmp_path / name, arch=arch)


def test_unsupported_adapter_settings_are_named(base, tmp_path):
    fam, torch_model, path, _ = base
    pm = peft.get_peft_model(copy.deepcopy(torch_model), PEFT_CONFIGS["lora"](fam))
    pm.save_pretrained(tmp_path / "a")
    conf_path = tmp_path / "a" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf["use_dora"] = True
    conf_path.write_text(json.dumps(conf))
    model, arch = ours(path)
    with pytest.raises(ConfigError, match="use_dora"):
        load_adapter(model, tmp_path / "a", arch=arch)
    conf_path.write_text(json.dumps({**conf, "use_dora": False, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match="IA3"):
        load_adapter(model, tmp_path / "a", arch=arch)


def test_a_lora_on_a_module_jaxlm_cannot_adapt_is_named(tmp_path):
    """BERT's MLM transform (cls.predictions.transform.dense) is a linear outside the layers, neither the token
    table nor the read-out: a ConfigError naming it, not a KeyError."""
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
        )
    ).eval()
    bert.save_pretrained(tmp_path / "bert")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["transform.dense", "query"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(bert), lora).save_pretrained(tmp_path / "a")
    model, arch = ours(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"adapts 'cls\.predictions\.transform\.dense', which jaxlm's LoRA"):
        load_adapter(model, tmp_path / "a", arch=arch)
