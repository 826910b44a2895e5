"""Alignment stage by stage on the embedded sets, each stage with its configs/*.yaml in its own process, then
their curves from metrics.jsonl: a reward model and DPO on the preference set, from the instruction-tuned LoRA
run (runs/sft_lora: `jaxlm train configs/sft_lora.yaml`); PPO and GRPO on the verse prompts with the
verse-form rule, from the default run (runs/llama_tiny: `jaxlm train configs/llama_tiny.yaml`).

    python experiments/align_curves.py [--stages reward,dpo,ppo,grpo] [--plot-only] [--quick]

Figures (held-out: the plays the instruction and preference sets hold out):
  reward  preference accuracy of the reward model before (a fresh score head) and after training
  dpo     preference accuracy before and after: the policy's own ranking (log π(chosen) > log π(rejected)) and
          DPO's implicit reward's (β·log π/π_ref, 0 for both before any update)
  ppo     held-out reward (jaxlm.rewards:verse_line, 0 to 1) and KL to the reference before and after
  grpo    the same
plus wall time per stage, and rollout vs training tokens/s for PPO and GRPO.
--quick runs a few steps of each (a smoke test of the script, minutes). Writes
experiments/results/align_curves.json and .png; runs go under runs/align/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("experiments/results")
STAGES = ("reward", "dpo", "ppo", "grpo")
QUICK = {  # a few steps of each stage
    "reward": ["train.steps=4", "train.eval_every=2", "train.eval_batches=2"],
    "dpo": ["train.steps=4", "train.eval_every=2", "train.eval_batches=2"],
    "ppo": ["train.steps=2", "train.eval_every=1", "train.eval_batches=1", "train.batch_size=8"],
    "grpo": ["train.steps=2", "train.eval_every=1", "train.eval_batches=1", "train.batch_size=4"],
}


def train(stage: str, root: Path, extra: list[str]) -> float:
    run = root / stage
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxlm", "train", f"configs/{stage}.yaml", f"train.run_dir={run}"]
    cmd += [*extra, "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{stage} failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - t


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(stage: str, run: Path, wall_s: float | None) -> dict:
    records = metrics(run)
    evals = [r for r in records if "val_loss" in r or "val_reward" in r]
    steps = [r for r in records if "val_loss" not in r and "val_reward" not in r and "skipped" not in r]
    before, after = evals[0], evals[-1]
    out = {"stage": stage, "wall_s": wall_s, "steps": after["step"], "before": before, "after": after}
    if stage in ("ppo", "grpo"):
        out["rollout_tokens_per_s"] = statistics.median(r["rollout_tokens_per_s"] for r in steps)
        out["train_tokens_per_s"] = statistics.median(r["train_tokens_per_s"] for r in steps)
        out["skipped_steps"] = sum(1 for r in records if r.get("skipped"))
    return out


def _smooth(xs, ys, k=10):
    out = [statistics.fmean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
    return xs, out


def plot(root: Path, stages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        records = metrics(root / stage)
        steps = [r for r in records if "val_loss" not in r and "val_reward" not in r and "skipped" not in r]
        evals = [r for r in records if "val_loss" in r or "val_reward" in r]
        x = [r["step"] for r in steps]
        if stage == "reward":
            ax.plot(*_smooth(x, [r["accuracy"] for r in steps]), label="train accuracy (10-step mean)", alpha=0.7)
            ax.plot([e["step"] for e in evals], [e["val_accuracy"] for e in evals], "o-", label="held-out accuracy")
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
            ax.set_title("reward model: preference accuracy", fontsize=10)
        elif stage == "dpo":
            ax.plot(*_smooth(x, [r["rewards/accuracies"] for r in steps]), label="train, implicit reward", alpha=0.7)
            ax.plot(
                [e["step"] for e in evals],
                [e["val_rewards/accuracies"] for e in evals],
                "o-",
                label="held-out, implicit reward",
            )
            ax.plot(
                [e["step"] for e in evals],
                [e["val_logps/accuracies"] for e in evals],
                "s--",
                label="held-out, log π ranking",
            )
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
            ax.set_title("DPO: preference accuracy", fontsize=10)
        else:
            ax.plot(*_smooth(x, [r["reward"] for r in steps]), label="train reward (10-step mean)", alpha=0.7)
            ax.plot([e["step"] for e in evals], [e["val_reward"] for e in evals], "o-", label="held-out reward")
            twin = ax.twinx()
            twin.plot(*_smooth(x, [r["kl"] for r in steps]), color="C3", alpha=0.6, label="KL (train)")
            twin.plot(
                [e["step"] for e in evals], [e["val_kl"] for e in evals], "s--", color="C3", label="KL (held-out)"
            )
            twin.set_ylabel("KL to reference (nats / response)", fontsize=8, color="C3")
            ax.set_title(f"{stage.upper()}: reward and KL", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | steps | wall | held-out before | held-out after | rollout / training tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        if r["stage"] == "reward":
            fig = lambda e: f"accuracy {e['val_accuracy']:.1%}, margin {e['val_margin']:.2f}"  # noqa: E731
        elif r["stage"] == "dpo":
            fig = lambda e: (  # noqa: E731
                f"log π ranking {e['val_logps/accuracies']:.1%}, implicit reward {e['val_rewards/accuracies']:.1%}"
            )
        else:
            fig = lambda e: f"reward {e['val_reward']:.3f}, KL {e['val_kl']:.3f}"  # noqa: E731
        speed = (
            f"{r['rollout_tokens_per_s']:,.0f} / {r['train_tokens_per_s']:,.0f}" if "rollout_tokens_per_s" in r else ""
        )
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else ""
        lines.append(f"| {r['stage']} | {r['steps']} | {wall} | {fig(b)} | {fig(a)} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--root", default="runs/align")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage")
    p.add_argument("--plot-only", action="store_true", help="summarize and plot existing runs")
    args = p.parse_args()
    stages, root = args.stages.split(","), Path(args.root)
    rows = []
    for stage in stages:
        wall = None
        if not args.plot_only:
            wall = train(stage, root, QUICK[stage] if args.quick else [])
        rows.append(summarize(stage, root / stage, wall))
        print(json.dumps(rows[-1]), flush=True)
    name = "align_curves_quick" if args.quick else "align_curves"
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"command": " ".join(sys.argv), "commit": commit, "stages": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(root, stages, RESULTS / f"{name}.png")
    print(table(rows))


if __name__ == "__main__":
    main()
