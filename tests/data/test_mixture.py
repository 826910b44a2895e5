"""Mixtures: a deterministic interleave by weight, exact to 1%, a pure function of (seed, k), resumed exactly."""

import gzip
import json

import numpy as np
import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.data.loader import MixtureLoader, mixture_schedule
from jaxlm.errors import DataError
from tests.conftest import TINY


def streams(sizes=(5000, 800, 20000)):
    """Source s holds only the ids [1000 s, 1000 s + 1000), so a window says where it came from."""
    rng = np.random.default_rng(0)
    return [(1000 * s + rng.integers(0, 1000, n)).astype(np.uint16) for s, n in enumerate(sizes)]


def test_realised_proportions_are_within_one_percent_of_the_weights():
    weights = [0.6, 0.1, 0.3]
    loader = MixtureLoader(streams(), weights, seq_len=8, batch_size=25, seed=5)
    batches = [loader.batch(k)["inputs"] for k in range(400)]  # 10,000 windows
    source = np.concatenate(batches)[:, 0] // 1000
    share = np.bincount(source, minlength=3) / len(source)
    np.testing.assert_allclose(share, weights, atol=0.01)
    assert np.all(np.concatenate(batches) // 1000 == source[:, None])  # a window never straddles sources
    counted = loader.consumed(400)
    assert sum(counted[f"data/{i}_tokens"] for i in "012") == 10_000 * 8
    np.testing.assert_allclose([counted[f"data/{i}_tokens"] / 80_000 for i in "012"], weights, atol=0.001)
    # the small source ran through several epochs, each window once per epoch
    assert counted["data/1_epochs"] > 10 and counted["data/0_epochs"] < counted["data/1_epochs"]


def test_schedule_shares_hold_in_every_prefix():
    source, index, counts = mixture_schedule([3, 1, 1], period=1000)
    assert list(counts) == [600, 200, 200]
    for j in (10, 97, 500, 1000):
        np.testing.assert_allclose(np.bincount(source[:j], minlength=3), np.array([0.6, 0.2, 0.2]) * j, atol=1)
    for s in range(3):  # each source's windows in order
        assert list(index[source == s]) == list(range(counts[s]))


def test_batches_are_a_pure_function_of_seed_and_step_and_split_over_processes():
    a = MixtureLoader(streams(), [2, 1, 1], seq_len=8, batch_size=6, seed=1)
    b = MixtureLoader(streams(), [2, 1, 1], seq_len=8, batch_size=6, seed=1)
    for k in (7, 0, 300, 3):  # any order
        np.testing.assert_array_equal(a.batch(k)["inputs"], b.batch(k)["inputs"])
    halves = [MixtureLoader(streams(), [2, 1, 1], seq_len=8, batch_size=6, seed=1, rows=r) for r in ((0, 3), (3, 6))]
    for k in range(5):
        got = np.concatenate([h.batch(k)["targets"] for h in halves])
        np.testing.assert_array_equal(got, a.batch(k)["targets"])
    c = MixtureLoader(streams(), [2, 1, 1], seq_len=8, batch_size=6, seed=2)
    assert not np.array_equal(c.batch(0)["inputs"], a.batch(0)["inputs"])
    a.position = 9
    with pytest.raises(DataError, match="weights"):
        MixtureLoader(streams(), [1, 1, 1], seq_len=8, batch_size=6, seed=1).restore(a.state())
    with pytest.raises(DataError, match="too few"):
        MixtureLoader(streams((5000, 8)), [1, 1], seq_len=8, batch_size=6)


def _jsonl_gz(path, word, n):
    rows = [{"text": f"{word} {i} " + f"{word} lorem ipsum " * (i % 5 + 2)} for i in range(n)]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


def test_a_mixture_trains_reports_its_sources_and_resumes_exactly(tmp_path):
    from jaxlm.train import read_metrics, train

    _jsonl_gz(tmp_path / "web.jsonl.gz", "web", 300)
    (tmp_path / "books").mkdir()
    for i in range(4):
        (tmp_path / "books" / f"{i}.txt").write_text(f"book {i} chapter one " * 200)
    mix = f"data.mixture=[{{source: {tmp_path / 'web.jsonl.gz'}, weight: 3}}, {{source: {tmp_path / 'books'}, weight: 1}}]"
    full = mixture_config(mix, "train.steps=6", f"train.run_dir={tmp_path / 'full'}")
    train(full, progress=False)
    split = mixture_config(mix, "train.steps=6", f"train.run_dir={tmp_path / 'split'}")
    train(split, stop_after=3, progress=False)
    train(split, progress=False)
    a, b = (read_metrics(tmp_path / r) for r in ("full", "split"))
    la, lb = ({m["step"]: m["loss"] for m in x if "loss" in m} for x in (a, b))
    assert la == lb and sorted(la) == list(range(1, 7))  # bit-for-bit, step by step
    last = [m for m in a if m.get("step") == 6 and "data/web_tokens" in m][0]
    assert last["data/web_tokens"] + last["data/books_tokens"] == 6 * 4 * 32  # steps x batch x seq_len
    assert last["data/web_tokens"] == 3 * last["data/books_tokens"]
    assert last["data/books_epochs"] > 0


def test_mixture_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="weights must be positive"):
        mixture_config("data.mixture=[{source: a, weight: 0}]")
    with pytest.raises(ConfigError, match="names .* repeat"):
        mixture_config("data.mixture=[{source: a/x.jsonl}, {source: b/x.jsonl}]")
    with pytest.raises(ConfigError, match="unknown config key"):
        mixture_config("data.mixture=[{source: a, wieght: 1}]")
    with pytest.raises(ConfigError, match="data.source .* or data.mixture, not both"):
        mixture_config("data.mixture=[{source: a}]", "data.source=b.txt")
    with pytest.raises(ConfigError, match="packed text"):
        load_config("configs/t5_tiny.yaml", ["data.mixture=[{source: a}]"])


def mixture_config(*overrides):
    """The tiny test model (tests/conftest.py) on bytes, without the fixture's data.source."""
    return load_config("configs/llama_tiny.yaml", [*TINY, "data.tokenizer=byte", *overrides])


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_later_steps(tmp_path):
    """On a prepared mixture, SIGKILL (no chance to save) after a checkpoint, rerun: every later step equals an
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from jaxlm.train import read_metrics, train

    _jsonl_gz(tmp_path / "web.jsonl.gz", "web", 300)
    (tmp_path / "books.txt").write_text("a book of many words, line after line\n" * 400)
    mix = f"data.mixture=[{{source: {tmp_path / 'web.jsonl.gz'}, weight: 2}}, {{source: {tmp_path / 'books.txt'}}}]"
    # A constant learning rate after warmup (min_lr_ratio=1): the killed run's longer schedule is the same.
    common = [*TINY, "data.tokenizer=byte", mix, "train.steps=10", "train.ckpt_every=3", "train.min_lr_ratio=1.0"]
    train(mixture_config(*common, f"train.run_dir={tmp_path / 'full'}"), progress=False)
    run = tmp_path / "killed"
    cmd = ["train", "configs/llama_tiny.yaml", *common, f"train.run_dir={run}", "train.steps=100000", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlm", *cmd],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / "6").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert (run / "checkpoints" / "6").is_dir(), f"the run never reached its second checkpoint:\n{err[-2000:]}"
    train(mixture_config(*common, f"train.run_dir={run}"), progress=False)
    full = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "full") if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}  # the rerun's lines come last
    assert sorted(full) == list(range(1, 11))
    assert [resumed[s] for s in range(7, 11)] == [full[s] for s in range(7, 11)]
