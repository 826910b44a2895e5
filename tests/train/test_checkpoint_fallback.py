"""A corrupt newest checkpoint: resume, eval, generate and convert fall back to the newest good one."""

import logging
import shutil
import subprocess
import sys

import pytest

from jaxlm.cli import main
from jaxlm.data.tokenizer import DataError
from jaxlm.train import read_metrics, train
from jaxlm.train.run_dir import load_run


def _truncate_data(step_dir):
    big = max((step_dir / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])


def _remove_item(step_dir):
    shutil.rmtree(step_dir / "params")


def _garbage_metadata(step_dir):
    (step_dir / "params" / "_METADATA").write_text("not json at all {")


def _garbage_metadata_same_size(step_dir):  # the size check passes: orbax's own read must fail
    path = step_dir / "meta" / "metadata"
    path.write_bytes(b"#" * path.stat().st_size)


def _truncate_without_manifest(step_dir):  # a checkpoint written before manifests existed
    (step_dir / "jaxlm_files.json").unlink()
    _truncate_data(step_dir)


CORRUPTIONS = [_truncate_data, _remove_item, _garbage_metadata, _garbage_metadata_same_size, _truncate_without_manifest]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, corpus_file):
    from jaxlm.config import load_config
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("ckpt") / "run"
    extra = ["train.ckpt_every=2", "train.keep_checkpoints=3", "data.tokenizer=byte"]
    cfg = load_config("configs/llama_tiny.yaml", TINY + extra + [f"data.source={corpus_file}", f"train.run_dir={run}"])
    train(cfg, progress=False)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4, 6]
    return cfg, run


def _copy(good_run, tmp_path, corrupt):
    cfg, run = good_run
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    corrupt(dest / "checkpoints" / "6")
    return cfg, dest


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_eval_and_generate_fall_back_with_one_line(good_run, tmp_path, corrupt, caplog):
    _, run = _copy(good_run, tmp_path, corrupt)
    with caplog.at_level(logging.WARNING, logger="jaxlm.train.checkpoint"):
        _, _, _, step = load_run(run)
    assert step == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxlm.train.checkpoint"]
    assert len(lines) == 1 and "checkpoints/6 is unreadable or incomplete" in lines[0], lines
    assert "\n" not in lines[0] and len(lines[0]) < 400


def test_resume_continues_from_the_good_checkpoint(good_run, tmp_path, capsys):
    cfg, run = _copy(good_run, tmp_path, _truncate_data)
    import dataclasses

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run), steps=8))
    out = train(cfg, progress=False)
    assert out["step"] == 8
    # Steps 5 and 6 ran again after the fallback; the unreadable checkpoint is kept aside, not deleted.
    assert (run / "checkpoints.unreadable" / "6" / "params").is_dir()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4, 6, 8]
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps[-4:] == [5, 6, 7, 8]
    assert load_run(run)[3] == 8


def test_cli_eval_and_convert_say_one_line(good_run, tmp_path, capsys):
    _, run = _copy(good_run, tmp_path, _truncate_without_manifest)  # orbax itself meets the truncated file
    cmd = [sys.executable, "-m", "jaxlm", "eval", str(run), "--batches", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr
    warned = [line for line in out.stderr.splitlines() if "is unreadable or incomplete" in line]
    assert len(warned) == 1 and "checkpoints/6" in warned[0], out.stderr
    assert out.stdout.startswith("step 4: val loss")
    assert main(["generate", str(run), "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "a_file" / "hf")]) == 2  # an OS error
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Not a directory" in err and "Traceback" not in err, err


def test_no_readable_checkpoint_is_an_error(good_run, tmp_path, capsys):
    _, run = _copy(good_run, tmp_path, _truncate_data)
    for step in (2, 4):
        _remove_item(run / "checkpoints" / str(step))
    with pytest.raises(DataError, match="no readable checkpoint in .*6 \\(.*4 \\(params/ is missing"):
        load_run(run)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: no readable checkpoint")


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(good_run, tmp_path):
    """A parameter tree that differs (another config, a code change) names its first differing path; no
    checkpoint is skipped or moved."""
    import yaml

    from jaxlm.config import ConfigError

    _, run = good_run
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    config = dest / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["model"]["mlp_dim"] = 96
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"mlp.* has shape \(2, 32, 64\) in the checkpoint, \(2, 32, 96\)"):
        load_run(dest)
    assert sorted(int(p.name) for p in (dest / "checkpoints").iterdir()) == [2, 4, 6]
    assert not (dest / "checkpoints.unreadable").exists()
