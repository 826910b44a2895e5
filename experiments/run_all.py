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
    "attention_heads": "MHA vs GQA vs MQA at matched parameters",
    "kv_cache": "KV cache: time per token vs context length",
    "memory_parallelism": "memory per device by ZeRO stage, tensor and pipeline layout",
}
START, END = "<!-- results -->", "<!-- /results -->"


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
    lines += ["", f"Total wall time of these runs on this machine: {total / 60:.1f} min.", "", END]
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
