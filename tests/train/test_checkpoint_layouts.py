"""Run directories of an older parameter layout (committed fixtures, written by jaxlm at 8534a4e) generate and
resume as the jaxlm that wrote them did; a newer layout is refused with what to do."""

import json
import shutil
from pathlib import Path

import pytest

from jaxlm.cli import main
from jaxlm.config import ConfigError, load_config
from jaxlm.train.checkpoint import LAYOUT, migrate_path
from jaxlm.train.trainer import read_metrics, train

FIXTURES = Path(__file__).parent.parent / "fixtures" / "layout1"
# What jaxlm at 8534a4e computed from these checkpoints, resumed for one more step: (loss, held-out loss).
RESUMED = {"llama_tiny": (5.553220748901367, 5.52773904800415), "t5_tiny": (5.451597690582275, 5.360909938812256)}


def test_renames_reach_this_layout():
    assert migrate_path("0/mu/layers/attn/wq/value", 1) == "0/mu/stack/layers/attn/wq/value"
    assert migrate_path("encoder/mlp_norm/scale/value", 1) == "encoder/layers/mlp_norm/scale/value"
    assert migrate_path("decoder_bias/value", 1) == "decoder/relative_bias/value"
    assert migrate_path("embed/embedding/value", 1) == "embed/embedding/value"
    assert migrate_path("stack/layers/attn/wq/value", LAYOUT) == "stack/layers/attn/wq/value"


def test_an_older_run_generates_as_it_did(capsys):
    greedy = ["--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(FIXTURES / "llama_tiny"), *greedy]) == 0
    assert capsys.readouterr().out == "To beIG\ufffdd\ufffd\ufffd\ufffd\ufffdvTuu\n"


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_an_older_run_resumes_exactly_and_then_writes_this_layout(name, tmp_path):
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    out = train(load_config(run / "config.yaml", ["train.steps=3", f"train.run_dir={run}"]), progress=False)
    step3 = [m for m in read_metrics(run) if m.get("step") == 3]
    loss, val_loss = RESUMED[name]
    assert step3[0]["loss"] == pytest.approx(loss, rel=1e-5) and out["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert json.loads((run / "checkpoints" / "3" / "meta" / "metadata").read_text())["layout"] == LAYOUT
    assert (
        train(load_config(run / "config.yaml", ["train.steps=4", f"train.run_dir={run}"]), progress=False)["step"] == 4
    )


def test_a_newer_layout_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "llama_tiny", run)
    meta = run / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "layout": LAYOUT + 1}))
    manifest = run / "checkpoints" / "2" / "jaxlm_files.json"  # as a newer jaxlm would have written it
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "meta/metadata": meta.stat().st_size}))
    with pytest.raises(ConfigError, match=f"parameter layout {LAYOUT + 1}, written by a newer jaxlm.*upgrade"):
        train(load_config(run / "config.yaml", ["train.steps=3", f"train.run_dir={run}"]), progress=False)
    assert (run / "checkpoints" / "2").is_dir()  # nothing moved
