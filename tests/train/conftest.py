import pytest

from jaxlm.cli import main
from tests.conftest import TINY


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, corpus_file):
    """A tiny pretrained run (BPE tokenizer) to fine-tune and align."""
    run = tmp_path_factory.mktemp("base") / "run"
    args = ["train", "configs/llama_tiny.yaml", *TINY, f"data.source={corpus_file}", f"train.run_dir={run}"]
    assert main([*args, "data.tokenizer=bpe", "--no-progress"]) == 0
    return run
