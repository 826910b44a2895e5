import os

# Tests run on CPU, with 8 host devices for the sharding tests (set before JAX is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The suite is bound by XLA compiles (~50 ms for one eager op on this CPU), and its tests, workers and the
# subprocesses they start (inheriting the environment) compile the same tiny programs again and again: one
# persistent compilation cache, shared by all, compiles each once. JAXLM_TEST_COMPILE_CACHE= (empty) turns it off.
_cache = os.environ.setdefault(
    "JAXLM_TEST_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxlm-tests", "jax-compile")
)
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# float32 matmuls at full precision on every backend: the tests compare against references to ~1e-5, and JAX's
# default on recent NVIDIA GPUs is TF32 (10-bit mantissa). It changes nothing on the CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Corpora prepared by the tests go to a cache of this test session, not the user's (jaxlm.data.prepare).
if "JAXLM_DATA_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAXLM_DATA_CACHE"] = tempfile.mkdtemp(prefix="jaxlm-test-data-")
    atexit.register(shutil.rmtree, os.environ["JAXLM_DATA_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

from jaxlm.config import load_config  # noqa: E402

TINY = [
    "model.vocab_size=300",
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.mlp_dim=64",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.ckpt_every=0",
    "train.log_every=1",
    "train.lr=1e-2",
    "mesh.data=1",
]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small multi-lingual text file (English verse, Chinese, emoji)."""
    from jaxlm.data.corpus import embedded_works

    text = embedded_works()["sonnets.txt"][:60_000] + "\n你好，世界。🎉 café naïve\n" * 20
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path, corpus_file):
    """Builds a tiny Config for `base` (llama_tiny / gpt_tiny) on the small corpus."""

    def make(base="llama_tiny", *overrides, run_dir=None):
        extra = [f"data.source={corpus_file}", f"train.run_dir={run_dir or tmp_path / 'run'}", "data.tokenizer=byte"]
        return load_config(f"configs/{base}.yaml", TINY + extra + list(overrides))

    return make


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, corpus_file):
    """A tiny pretrained run (BPE tokenizer) to fine-tune, align and serve."""
    from jaxlm.cli import main

    run = tmp_path_factory.mktemp("base") / "run"
    args = ["train", "configs/llama_tiny.yaml", *TINY, f"data.source={corpus_file}", f"train.run_dir={run}"]
    assert main([*args, "data.tokenizer=bpe", "--no-progress"]) == 0
    return run


# The modules that take longest, first: pytest-xdist (--dist loadscope) hands out modules in collection order,
# and a long module handed out last would run alone at the end while the other workers idle.
LONGEST_FIRST = [
    "tests/parallel/test_layouts.py",
    "tests/train/test_trainer.py",
    "tests/train/test_rl.py",
    "tests/train/test_align.py",
    "tests/experiments/test_positions.py",
    "tests/experiments/test_long_context.py",
    "tests/experiments/test_norms_mlp.py",
    "tests/experiments/test_attention_heads.py",
    "tests/parallel/test_multiprocess.py",
    "tests/hf/test_real_model.py",
    "tests/hf/test_convert.py",
    "tests/test_speculative.py",
    "tests/test_engine.py",
    "tests/test_generate.py",
    "tests/train/test_finetune.py",
    "tests/test_peft.py",
    "tests/hf/test_peft_parity.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep order


# XLA:CPU maps each compiled program's code into a few pages of its own (~3 memory maps a program), and JAX
# keeps every program it compiled. One pytest worker runs half the suite: ~10,000 programs exceed Linux's
# 65,530 maps a process (vm.max_map_count), and the next mmap fails inside XLA as a segfault. Past half that
# limit, a test's end drops JAX's caches (programs compile again, from the persistent cache).
MAX_MAPS = 32_000


def _maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the test's fixtures are finalized: what only they held is free
    if _maps() > MAX_MAPS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
