"""Fine-tuning methods side by side: full, LoRA (two ranks), QLoRA, prompt tuning, prefix tuning.

Each method fine-tunes the default pretrained run (runs/llama_tiny; make it with
`jaxlm train configs/llama_tiny.yaml`) on the embedded instruction set with its configs/sft_*.yaml, in its
own process, and reports: trainable parameters, optimizer-state bytes, bytes of the frozen base as stored
(QLoRA's NF4), the compiled train step's peak memory (XLA's memory analysis) and the process's peak
resident set, training tokens/s, held-out loss, and exact match (greedy answers) on the held-out plays and on
as many examples of the training plays.
"base" is the pretrained run itself, asked the same questions.

    python experiments/peft_compare.py [--steps 200] [--methods full,lora_r8,...]

Writes experiments/results/peft_compare.json and .png (runs under runs/peft_compare/, not committed).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {  # name -> (config, overrides)
    "full": ("sft_full", []),
    "lora_r8": ("sft_lora", []),
    "lora_r32": ("sft_lora", ["peft.rank=32", "peft.alpha=64"]),
    "qlora": ("sft_qlora", []),
    "prompt": ("sft_prompt", []),
    "prefix": ("sft_prefix", []),
}
RESULTS = Path("experiments/results")


def _bytes(tree) -> int:
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def measure_base(base: str) -> dict:
    from jaxlm.data.shakespeare_instructions import instruction_splits
    from jaxlm.train.exact_match import exact_match
    from jaxlm.train.run_dir import load_run

    _, tokenizer, model, _ = load_run(base)
    train_examples, val_examples = instruction_splits()
    em = exact_match(model, tokenizer, val_examples)
    seen = exact_match(model, tokenizer, train_examples[: len(val_examples)])  # plays (and names) it trained on
    return {
        "method": "base",
        "exact_match": em["exact_match"],
        "exact_match_by_task": em["by_task"],
        "train_exact_match": seen["exact_match"],
    }


def measure(method: str, steps: int, root: Path) -> dict:
    """Trains one method and measures it (run in a fresh process: its peak memory is its own)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxlm.config import load_config
    from jaxlm.data.shakespeare_instructions import instruction_splits
    from jaxlm.nn.quantized import NF4Weight, Quantized
    from jaxlm.peft import trainable
    from jaxlm.train.data import make_batches
    from jaxlm.train.exact_match import exact_match
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.run_dir import load_run
    from jaxlm.train.sharded import ShardedTraining
    from jaxlm.train.trainer import read_metrics, train

    config, overrides = METHODS[method]
    run = root / method
    every = f"train.eval_every={steps}", f"train.ckpt_every={steps}"
    cfg = load_config(f"configs/{config}.yaml", [*overrides, f"train.run_dir={run}", f"train.steps={steps}", *every])
    t = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - t
    cfg, tokenizer, model, _ = load_run(run)  # the resolved config, and the model as generate/eval load it
    trained = nnx.state(model, trainable(cfg.peft))
    frozen = nnx.state(model, nnx.Not(trainable(cfg.peft)))
    n_trained = sum(int(x.size) for x in jax.tree.leaves(trained))
    opt = jax.eval_shape(make_optimizer(cfg.train).init, trained)
    nf4 = [m for _, m in nnx.iter_graph(model) if isinstance(m, NF4Weight)]
    quantized_params = sum(int(np.prod(m.shape)) * (m.codes.shape[0] if m.codes.ndim > 1 else 1) for m in nf4)
    quantized_bytes = _bytes(nnx.state(model, Quantized))
    n_frozen = quantized_params + sum(int(x.size) for x in jax.tree.leaves(nnx.state(frozen, nnx.Param)))
    # the compiled step's per-device memory, for one real batch's shapes
    sharded = ShardedTraining(cfg)
    state = jax.eval_shape(sharded._init)
    train_examples, val_examples = instruction_splits()
    _, val_batches = make_batches(cfg, tokenizer, None, val_examples)
    batch = next(iter(val_batches(1)))
    shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    analysis = sharded.train_step.lower(state, shapes).compile().memory_analysis()
    step_peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )
    rates = [m["tokens_per_s"] for m in read_metrics(run) if "tokens_per_s" in m and m["step"] > 5]
    em = exact_match(model, tokenizer, val_examples)
    seen = exact_match(model, tokenizer, train_examples[: len(val_examples)])  # plays (and names) it trained on
    return {
        "method": method,
        "config": f"configs/{config}.yaml",
        "overrides": overrides,
        "steps": steps,
        "trainable_params": n_trained,
        "trainable_fraction": n_trained / (n_trained + n_frozen),
        "optimizer_state_bytes": _bytes(opt),
        "frozen_bytes": _bytes(frozen),
        "nf4_bits_per_param": 8 * quantized_bytes / quantized_params if quantized_params else None,
        "step_peak_bytes": int(step_peak),
        "step_argument_bytes": int(analysis.argument_size_in_bytes),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_s": statistics.median(rates) if rates else None,
        "train_wall_s": wall,
        "val_loss": result.get("val_loss"),
        "exact_match": em["exact_match"],
        "exact_match_by_task": em["by_task"],
        "train_exact_match": seen["exact_match"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (PercentFormatter)

    trained = [r for r in rows if r["method"] != "base"]
    names = [r["method"] for r in trained]
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.2))
    panels = [
        ("exact match: held-out plays", [r["exact_match"] for r in rows], [r["method"] for r in rows], False),
        ("held-out loss (answer tokens)", [r["val_loss"] for r in trained], names, False),
        ("trainable parameters", [r["trainable_params"] for r in trained], names, True),
        ("exact match: training plays", [r["train_exact_match"] for r in rows], [r["method"] for r in rows], False),
        ("params + optimizer state (MiB)", [r["step_argument_bytes"] / 2**20 for r in trained], names, False),
    ]
    for ax, (title, values, labels, log) in zip(axes, panels):
        ax.bar(labels, values, color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        if log:
            ax.set_yscale("log")
        if title.startswith("exact match"):
            ax.set_ylim(0, max(0.05, 1.15 * max(values)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def table(rows: list[dict]) -> str:
    head = (
        "| method | trainable params | optimizer state | frozen base | step arguments / peak | peak RSS | tokens/s "
        "| held-out loss | exact match: held-out / training plays |"
    )
    lines = [head, "|" + "---|" * 9]
    mib = 2**20
    for r in rows:
        em = f"{r['exact_match']:.1%} / {r['train_exact_match']:.1%}"
        if r["method"] == "base":
            lines.append(f"| base (no fine-tuning) | | | | | | | | {em} |")
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_fraction']:.2%}) "
            f"| {r['optimizer_state_bytes'] / mib:.2f} MiB | {r['frozen_bytes'] / mib:.1f} MiB "
            f"| {r['step_argument_bytes'] / mib:.1f} / {r['step_peak_bytes'] / mib:.0f} MiB "
            f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['tokens_per_s'] or 0:,.0f} | {r['val_loss']:.3f} | {em} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--base", default="runs/llama_tiny")
    p.add_argument("--root", default="runs/peft_compare")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.steps, Path(args.root))), flush=True)
        return
    import shutil

    rows = [measure_base(args.base)]
    print(json.dumps(rows[0]), flush=True)
    for method in args.methods.split(","):
        shutil.rmtree(Path(args.root) / method, ignore_errors=True)
        cmd = [sys.executable, __file__, "--one", method, "--steps", str(args.steps), "--root", args.root]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-4000:]}")
        row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peft_compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, RESULTS / "peft_compare.png")
    print(table(rows))


if __name__ == "__main__":
    main()
