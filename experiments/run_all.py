"""Runs every gallery experiment, then rebuilds the results table of experiments/README.md from their JSON.

    python experiments/run_all.py [--quick] [--only kv_cache,attention_heads] [--out-dir DIR]

Each experiment runs in its own process (its memory and devices are its own) and writes DIR/NAME.json and
.png (default experiments/results/; --quick results are smoke tests, write them elsewhere). The table
between the `<!-- results -->` markers of the README gets one line per experiment: its one-line result,
wall time and commit, and their total (`--table-only`: rebuild it from the results without running).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: the question it answers (the gallery's order)
EXPERIMENTS = {
    "positions": "position encodings and length extrapolation",
    "attention_heads": "MHA vs GQA vs MQA at matched parameters",
    "norms_mlp": "pre- vs post-norm, LayerNorm vs RMSNorm, GELU MLP vs SwiGLU",
    "kv_cache": "KV cache: time per token vs context length",
    "precision": "fp32 vs bf16 vs fp16 with loss scaling",
    "memory_parallelism": "memory per device by ZeRO stage, tensor and pipeline layout",
    "tokenization": "bytes vs BPE 512 / 2048 / 8192",
    "scaling": "loss vs parameters at fixed data",
    "moe": "dense vs mixture of experts at equal active and total parameters; balancing",
    "long_context": "train-step memory and speed vs T: blockwise attention, chunked loss, context parallelism, YaRN",
}
# Measured by the fine-tuning and alignment issues' scripts, which start from the pretrained runs/llama_tiny and
# its fine-tuned runs (see the main README): run_all does not rerun them, the table shows their results.
EARLIER = {
    "peft_compare": "full fine-tuning vs LoRA, QLoRA, prompt and prefix tuning",
    "align_curves": "reward model, DPO, PPO and GRPO on the pretrained model",
}
START, END = "<!-- results -->", "<!-- /results -->"


def earlier_summary(name: str, r) -> tuple[str, float]:
    """One-line result and wall time of an earlier experiment's JSON (written before the gallery's format)."""
    if name == "peft_compare":
        rows = {m["method"]: m for m in r if "val_loss" in m}
        full = rows["full"]
        parts = [f"{m} {x['val_loss']:.3f} ({x['trainable_fraction']:.1%} trainable)" for m, x in rows.items()]
        wall = sum(x["train_wall_s"] for x in rows.values())
        return f"held-out loss after {full['steps']} steps of SFT: {'; '.join(parts)}", wall
    parts = []
    for s in r["stages"]:
        b, a = s["before"], s["after"]
        if s["stage"] == "reward":
            parts.append(f"reward model accuracy {b['val_accuracy']:.2f} -> {a['val_accuracy']:.2f}")
        elif s["stage"] == "dpo":
            won = a["val_rewards/accuracies"]
            parts.append(f"DPO loss {b['val_loss']:.3f} -> {a['val_loss']:.3f} (chosen preferred {won:.0%})")
        else:
            parts.append(
                f"{s['stage'].upper()} reward {b['val_reward']:.2f} -> {a['val_reward']:.2f} (KL {a['val_kl']:.2f})"
            )
    return "held-out, before -> after: " + "; ".join(parts), sum(s["wall_s"] or 0 for s in r["stages"])


def table(out_dir: Path, names: list[str]) -> str:
    lines = [START, "", "| experiment | result | wall time | commit |", "|---|---|---|---|"]
    total = 0.0
    for name in names:
        path = out_dir / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        total += r["wall_s"]
        lines.append(f"| `{name}.py`: {EXPERIMENTS[name]} | {r['summary']} | {r['wall_s']:.0f} s | {r['commit']} |")
    ran = total
    for name, question in EARLIER.items():
        path = out_dir / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        summary, wall = earlier_summary(name, r)
        total += wall
        commit = r.get("commit", "before the gallery") if isinstance(r, dict) else "before the gallery"
        lines.append(f"| `{name}.py`: {question} | {summary} | {wall:.0f} s | {commit} |")
    lines += ["", f"Total wall time of the gallery's runs on this machine: {ran / 60:.1f} min", ""]
    lines[-2] += f" ({total / 60:.1f} min with the fine-tuning and alignment runs)." if total > ran else "."
    lines += [END]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated names")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--readme", default=str(HERE / "README.md"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the results, run nothing")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; known: {sorted(EXPERIMENTS)}")
    out_dir = Path(args.out_dir)
    started, failed = time.perf_counter(), []
    for name in [] if args.table_only else names:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out_dir / name)]
        cmd += ["--quick"] if args.quick else []
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    total = time.perf_counter() - started
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    if START in text and END in text:
        block = table(out_dir, list(EXPERIMENTS))
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
        readme.write_text(text, encoding="utf-8")
        print(f"updated the results table of {readme}")
    if not args.table_only:
        print(f"{len(names) - len(failed)} of {len(names)} experiments ran in {total / 60:.1f} min")
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
