"""The one loader of a run directory, a Hugging Face directory or a GGUF file: what it returns, and its errors,
which name the caller."""

import pytest

from jaxlm.data.chat import CHATML
from jaxlm.errors import ConfigError, DataError
from jaxlm.train.run_dir import load_model_dir
from tests.train.test_checkpoint_layouts import FIXTURES


def test_a_run_loads_with_its_config_template_and_step():
    loaded = load_model_dir(FIXTURES / "llama_tiny", what="jaxlm generate", generates=True)
    assert loaded.cfg.model == loaded.model.cfg and loaded.source.endswith("(step 2)")
    assert loaded.template == CHATML and loaded.prefix_lm is False and loaded.tokenizer.vocab_size <= 260


def test_errors_name_the_caller_and_the_mismatch(tmp_path):
    with pytest.raises(DataError, match=r"^align\.reward: .*missing does not exist; it should be a jaxlm run"):
        load_model_dir(tmp_path / "missing", what="align.reward")
    with pytest.raises(DataError, match="^--draft: .* has neither config.yaml nor config.json"):
        load_model_dir(tmp_path, what="--draft")
    with pytest.raises(ConfigError, match=r"align\.reward: .* has a model\.head=lm model \(it writes text.*head=score"):
        load_model_dir(FIXTURES / "llama_tiny", what="align.reward", head="score")
