from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxlm.config import PRESETS, Config, ConfigError, load_config, save_config
from jaxlm.nn.models import active_params, build_model, count_params

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_tiny_configs_are_the_families_they_claim():
    gpt, llama = load_config("configs/gpt_tiny.yaml").model, load_config("configs/llama_tiny.yaml").model
    assert (gpt.position, gpt.norm, gpt.mlp, gpt.kv_heads, gpt.tie_embeddings) == (
        "learned",
        "layernorm",
        "plain",
        gpt.num_heads,
        True,
    )
    assert (llama.position, llama.norm, llama.mlp, llama.activation) == ("rope", "rmsnorm", "gated", "silu")
    assert 1 < llama.kv_heads < llama.num_heads


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_builds_and_runs_abstractly(path):
    """Each config's model is built and its forward traced, from shapes alone (7B configs allocate nothing)."""
    cfg = load_config(path).model
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    if cfg.decoder_layers:
        logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(tokens, tokens), state)
    else:
        logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(tokens)[0], state)
    assert logits.shape == (1, 8, cfg.num_labels if cfg.head == "score" else cfg.vocab_size)


PUBLISHED_COUNTS = [
    ("gpt2_124m", 124_439_808),
    ("llama2_7b", 6_738_415_616),
    ("llama3_8b", 8_030_261_248),
    ("gemma2_2b", 2_614_341_888),
    ("qwen3_0_6b", 596_049_920),
    ("phi3_mini", 3_821_079_552),
    ("mixtral_8x7b", 46_702_792_704),
    ("qwen3_30b_a3b", 30_532_122_624),
    ("gpt_oss_20b", 20_914_757_184),
    ("deepseek_v3", 671_026_419_200),
]
PUBLISHED_ACTIVE = [
    ("mixtral_8x7b", 12_879_925_248),
    ("qwen3_30b_a3b", 3_353_032_704),
    ("gpt_oss_20b", 3_608_307_264 + 201088 * 2880),  # OpenAI's 3.6B leaves out the embedding table
    ("deepseek_v3", 37_552_297_472),
    ("llama3_8b", 8_030_261_248),
]


@pytest.mark.parametrize("name,count", PUBLISHED_COUNTS)
def test_preset_parameter_counts_match_published_models(name, count):
    assert count_params(PRESETS[name]) == count


@pytest.mark.parametrize("name,count", PUBLISHED_ACTIVE)
def test_preset_active_parameters(name, count):
    assert active_params(PRESETS[name]) == count


def test_preset_in_yaml_with_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: llama3_8b, num_layers: 2}\n")
    cfg = load_config(p, ["data.seq_len=64"])
    assert cfg.model.num_kv_heads == 8 and cfg.model.num_layers == 2 and cfg.data.seq_len == 64


def test_overrides_parse_yaml_scalars():
    cfg = load_config("configs/llama_tiny.yaml", ["model.num_layers=3", "train.lr=1e-4", "model.qkv_bias=true"])
    assert cfg.model.num_layers == 3 and cfg.train.lr == 1e-4 and cfg.model.qkv_bias is True


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.num_layerz=3", "unknown config key(s): model.num_layerz"),
        ("optim.lr=3", "unknown config key(s): optim"),
        ("model.num_layers=two", "model.num_layers must be int, got 'two'"),
        ("model.num_layers=2.5", "model.num_layers must be int"),
        ("model.qkv_bias=3", "model.qkv_bias must be bool"),
        ("model.num_kv_heads=3", "model.num_heads (8) must be divisible by model.num_kv_heads (3)"),
        ("model.d_model=250", "model.d_model (250) must be divisible by model.num_heads (8)"),
        ("model.position=alibi2", "model.position must be one of"),
        ("data.seq_len=1000", "data.seq_len (1000) exceeds model.max_seq_len (256)"),
        ("train.batch_size=30", "train.batch_size (30) must be divisible by train.grad_accum"),
        ("model.preset=gpt5", "model.preset 'gpt5' is unknown"),
        ("model", "not of the form section.key=value"),
        ("train.steps=0", "train.steps must be positive"),
        ("model.dropout=1.0", "model.dropout must be in [0, 1)"),
        ("model.attention_dropout=-0.1", "model.attention_dropout must be in [0, 1)"),
    ],
)
def test_bad_config_errors_name_the_key(override, message):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as e:
        load_config("configs/llama_tiny.yaml", extra + [override])
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_bytes(b"model: {d_model: \xff}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("configs/gpt_tiny.yaml", ["model.num_layers=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
