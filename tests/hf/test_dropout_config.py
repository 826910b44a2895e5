"""Dropout rates of Hugging Face configs map to model.dropout / attention_dropout / mlp_dropout and back."""

import pytest

from jaxlm.hf.families import config_from_hf, config_to_hf
from tests.parity import require

transformers = require("transformers")

CASES = {
    # class, config kwargs, (dropout, attention_dropout, mlp_dropout), the HF keys written back
    "BertForMaskedLM": (
        "BertConfig",
        {},
        (0.1, 0.1, 0.0),
        {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    ),
    "GPT2LMHeadModel": (
        "GPT2Config",
        dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.05),
        (0.2, 0.05, 0.0),
        {"resid_pdrop": 0.2, "embd_pdrop": 0.2, "attn_pdrop": 0.05},
    ),
    "T5ForConditionalGeneration": ("T5Config", dict(dropout_rate=0.15), (0.15, 0.15, 0.15), {"dropout_rate": 0.15}),
    "LlamaForCausalLM": ("LlamaConfig", dict(attention_dropout=0.1), (0.0, 0.1, 0.0), {"attention_dropout": 0.1}),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_dropout_rates_map_both_ways(arch):
    cls, kwargs, rates, written = CASES[arch]
    hf = getattr(transformers, cls)(**kwargs).to_diff_dict()  # what save_pretrained writes
    hf["architectures"] = [arch]
    cfg, got_arch = config_from_hf(hf)
    assert got_arch == arch
    assert (cfg.dropout, cfg.attention_dropout, cfg.mlp_dropout) == rates
    out = config_to_hf(cfg, arch)
    assert {k: out[k] for k in written} == written
    back = getattr(transformers, cls)(**{k: v for k, v in out.items() if k != "architectures"})
    assert {k: getattr(back, k) for k in written} == written
