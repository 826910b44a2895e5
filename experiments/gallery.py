"""What every gallery experiment shares: where results go, and a result file that records its command, commit
and wall time beside the raw numbers (so a committed plot can be traced to the run that drew it)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def host_devices(n: int) -> None:
    """n emulated CPU devices: call before JAX is imported (a GPU or TPU run keeps its own)."""
    import os

    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = flags + f" --xla_force_host_platform_device_count={n}"


def training_args(doc: str, name: str, *, steps: int, argv=None, quick_help: str = "a tiny model, a few steps"):
    """The command line every training experiment takes: --quick, --steps, --root (its runs) and --out (its
    results, without suffix)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{quick_help}: under a minute")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--root", default=f"runs/gallery/{name}")
    p.add_argument("--out", default=str(RESULTS / name))
    return p.parse_args(argv)


def real_model_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line every real-model benchmark starts from: --model-dir (default: SmolLM2-135M-Instruct,
    see `real_model_dir`) and --out (its results, without suffix); the benchmark adds its own options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="a Hugging Face directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=str(RESULTS / name))
    return p


def bars(labels: list[str], values: list[float], *, ylabel: str, title: str, size=(5, 3)):
    """A one-panel bar chart, each bar its own colour: a benchmark's figure."""
    fig, ax = pyplot().subplots(figsize=size)
    ax.bar(labels, values, color=[f"C{i}" for i in range(len(values))])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip() or "unknown"


def save(out: Path, result: dict, figure, *, started: float) -> None:
    """Writes out.json (result + command, commit, wall time) and out.png (the matplotlib figure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **result,
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    figure.savefig(out.with_suffix(".png"), dpi=80)
    print(f"wrote {out.with_suffix('.json')} and .png")


def real_model_dir(path: str | None) -> str:
    """`path`, or the SmolLM2-135M-Instruct Hugging Face directory tests/real_model.py builds once a machine."""
    if path is not None:
        return path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.real_model import smollm2_hf_dir

    return str(smollm2_hf_dir())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --quick: a model and batch small enough that a training run takes seconds (later overrides win).
QUICK = ["model.d_model=32", "model.num_layers=1", "model.num_heads=8", "model.vocab_size=257"]
QUICK += [
    "data.tokenizer=byte",
    "data.seq_len=32",
    "train.batch_size=4",
    "model.max_seq_len=64",
    "train.warmup_steps=1",
]
# The full runs' common shape: llama_tiny at half width and batch (1.38M parameters, 6 steps/s here),
# so that a five-way comparison trains in minutes.
SMALL = ["model.d_model=128", "model.num_heads=4", "model.num_kv_heads=4", "model.mlp_dim=384", "train.batch_size=16"]


def non_embedding_parameters(model_cfg) -> int:
    """Parameters outside the embedding and read-out tables (Kaplan et al.'s N): the layers and norms."""
    from jaxlm.flops import matmul_params

    # matmul_params leaves out the lookup table; the read-out (tied or not) is the other vocab x d_model table
    return matmul_params(model_cfg) - model_cfg.vocab_size * model_cfg.d_model


def quick_corpus(root: Path) -> Path:
    """Six works' first 40 KB from the embedded corpus, as files under root (the last one validates): --quick runs
    would otherwise spend most of their seconds tokenizing the whole corpus and training BPE on it."""
    from jaxlm.data.corpus import embedded_works

    path = root / "quick_corpus"
    path.mkdir(parents=True, exist_ok=True)
    for name, text in list(embedded_works().items())[:6]:
        (path / name).write_text(text[:40_000], encoding="utf-8")
    return path


def train_variant(
    run: Path, overrides: list[str], *, steps: int, quick: bool, evals: int = 4, small: bool = True
) -> dict:
    """Trains configs/llama_tiny.yaml in the SMALL shape (small=False: its own; QUICK's with --quick), then
    `overrides`, from scratch in `run` for `steps` steps. Returns its final evaluation, curves (val_curve and
    val_bpb_curve: held-out figures every steps / evals steps; train_curve: the training loss of every step),
    median training tokens/s, wall time and config."""
    import shutil

    from jaxlm.config import load_config
    from jaxlm.train.trainer import read_metrics, train

    shutil.rmtree(run, ignore_errors=True)  # a previous run of another config must not be resumed
    every = max(1, steps // evals)
    base = [f"train.run_dir={run}", f"train.steps={steps}", f"train.eval_every={every}", f"train.ckpt_every={steps}"]
    base += [f"train.eval_batches={2 if quick else 8}", "mesh.data=1", f"train.log_every={max(1, steps // 40)}"]
    shape = QUICK + [f"data.source={quick_corpus(run.parent)}"] if quick else SMALL if small else []
    cfg = load_config("configs/llama_tiny.yaml", base + shape + overrides)
    started = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - started
    metrics = read_metrics(run)
    speeds = sorted(r["tokens_per_s"] for r in metrics if "tokens_per_s" in r)[1:]  # the first holds compilation
    return {
        "val_loss": round(result["val_loss"], 4),
        "val_bpb": round(result["val_bpb"], 4),
        "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in metrics if "val_loss" in r],
        "val_bpb_curve": [(r["step"], round(r["val_bpb"], 4)) for r in metrics if "val_bpb" in r],
        "train_curve": [(r["step"], round(r["loss"], 4)) for r in metrics if "loss" in r],
        "tokens_per_s": round(speeds[len(speeds) // 2], 1) if speeds else None,
        "train_wall_s": round(wall, 1),
        "config": cfg,
    }
