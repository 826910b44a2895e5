"""Speculative decoding at batch 1: tokens/s of the model alone, with the shipped draft model, and with
prompt lookup (ngram), on the same prompts in the same run; greedy outputs must be identical.

    python experiments/bench_speculative.py [--run-dir runs/llama_tiny] [--draft runs/llama_draft]
        [--new 256] [--prompts 6] [--draft-tokens 4]

Prompts are the openings of held-out speeches of the embedded corpus. Reports, per method: tokens/s,
speedup over plain decoding, drafted tokens kept (acceptance rate), tokens per model step. Also samples
(temperature 0.8) with each, for tokens/s only (the outputs differ; the distribution is the same, see
tests/test_speculative.py). Writes experiments/results/bench_speculative.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, commit  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/llama_tiny")
    p.add_argument("--draft", default="runs/llama_draft")
    p.add_argument("--new", type=int, default=256, help="tokens per prompt")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS / "bench_speculative"))
    args = p.parse_args()

    from jaxlm.data.corpus import embedded_works
    from jaxlm.generate import Generator
    from jaxlm.serve.model import load_draft
    from jaxlm.train.run_dir import load_run

    cfg, tokenizer, model, _ = load_run(args.run_dir)
    text = embedded_works()["tempest.txt"]
    starts = [i for i in range(len(text)) if text.startswith("\n\n", i)][100::40][: args.prompts]
    prompts = [tokenizer.encode(text[i + 2 : i + 200])[:32] for i in starts]
    methods = {"plain": None, "draft model": load_draft(args.draft, tokenizer), "ngram": "ngram"}
    rows, outputs = [], {}
    for temperature in (0.0, 0.8):
        for name, draft in methods.items():
            gen = Generator(model, draft=draft, draft_tokens=args.draft_tokens)
            gen.generate(prompts[:1], max_new_tokens=8, temperature=temperature)  # compile
            steps = drafted = kept = tokens = 0
            outs = []
            t = time.perf_counter()
            for i, prompt in enumerate(prompts):  # batch 1: one prompt at a time
                out = gen.generate([prompt], max_new_tokens=args.new, temperature=temperature, seed=i)[0]
                outs.append(out)
                tokens += len(out)
                s = gen.stats
                steps += s.get("steps", 0)
                drafted += s.get("drafted", 0)
                kept += s.get("kept", 0)
            wall = time.perf_counter() - t
            if temperature == 0.0:
                outputs[name] = outs
            row = {
                "method": name,
                "temperature": temperature,
                "tokens": tokens,
                "wall_s": round(wall, 2),
                "tokens_per_s": round(tokens / wall, 1),
                "acceptance": round(kept / drafted, 3) if drafted else None,
                "tokens_per_model_step": round(tokens / (steps + len(prompts)), 2) if draft is not None else 1.0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    for r in rows:
        base = next(b for b in rows if b["method"] == "plain" and b["temperature"] == r["temperature"])
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    identical = {name: outputs[name] == outputs["plain"] for name in methods}
    out = {
        "model": args.run_dir,
        "draft": args.draft,
        "draft_tokens": args.draft_tokens,
        "new_tokens": args.new,
        "prompts": len(prompts),
        "greedy_identical": identical,
        "rows": rows,
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
    }
    print(f"{'method':>12} {'temp':>5} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'tok/step':>9}")
    for r in rows:
        print(
            f"{r['method']:>12} {r['temperature']:>5} {r['tokens_per_s']:>8} {r['speedup']:>8} "
            f"{r['acceptance'] if r['acceptance'] is not None else '-':>7} {r['tokens_per_model_step']:>9}"
        )
    print("greedy output identical to plain:", identical)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.json')} and .png")
    if not all(identical.values()):
        raise SystemExit("speculative greedy output differs from plain decoding")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = ["plain", "draft model", "ngram"]
    for k, temperature in enumerate((0.0, 0.8)):
        rows = {r["method"]: r for r in out["rows"] if r["temperature"] == temperature}
        xs = [i + 0.38 * k for i in range(len(names))]
        bars = ax.bar(xs, [rows[n]["tokens_per_s"] for n in names], 0.36, label=f"temperature {temperature}")
        for b, n in zip(bars, names):
            acc = rows[n]["acceptance"]
            label = f"{rows[n]['speedup']}x" + (f"\n{acc:.0%} kept" if acc is not None else "")
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + 0.19 for i in range(len(names))], names)
    ax.set_ylabel("tokens/s at batch 1")
    ax.set_title(f"speculative decoding, {out['draft_tokens']} drafted tokens per step", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
