"""Fine-tuning a real model, measurably: LoRA on SmolLM2-135M-Instruct (configs/sft_lora_smollm2.yaml, the
embedded instruction set), against the base model and against peft + transformers.

1. Trains the config (or reuses --run when it already holds --steps steps).
2. Held-out exact match (the plays the run never trained on), per task, of the base model and of the run.
3. Training tokens/s: jaxlm's (the run's own log, median over its records after the first) against peft +
   transformers (torch eager, the same threads) on the same batch shape (8 x 128 tokens) and adapter settings
   (rank 8, alpha 16, no dropout, q k v o gate up down), AdamW at the same learning rate, timed in this run.
4. The adapter, exported with `jaxlm convert --to-hf`, loads in peft over the same base, and peft's greedy
   answers to --answers held-out prompts are compared with jaxlm's, token by token.

    python experiments/real_finetune.py [--steps 200] [--run runs/sft_lora_smollm2]

Writes experiments/results/real_finetune.json and .png.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, real_model_dir, real_model_parser, save  # noqa: E402

CONFIG = ROOT / "configs" / "sft_lora_smollm2.yaml"


def trained(run: Path, steps: int, base: str) -> dict:
    """Trains the config into `run` unless it holds `steps` steps already; returns the run's log figures."""
    from jaxlm.config import load_config
    from jaxlm.train.trainer import read_metrics, train

    done = [m["step"] for m in read_metrics(run) if "step" in m] if (run / "metrics.jsonl").exists() else []
    wall = None
    if not done or max(done) < steps:
        cfg = load_config(CONFIG, [f"finetune.init_from={base}", f"train.run_dir={run}", f"train.steps={steps}"])
        t = time.perf_counter()
        train(cfg, progress=True)
        wall = time.perf_counter() - t
    rates = [m["tokens_per_s"] for m in read_metrics(run) if "tokens_per_s" in m]
    return {"wall_s": wall, "tokens_per_s": statistics.median(rates[1:] or rates), "log_records": len(rates)}


def exact_matches(run: Path, base: str) -> dict:
    from jaxlm.data.shakespeare_instructions import instruction_splits
    from jaxlm.train.exact_match import exact_match
    from jaxlm.train.run_dir import load_model_dir

    _, held_out = instruction_splits()
    out = {}
    for name, path in (("base", base), ("lora", run)):
        loaded = load_model_dir(path, what="real_finetune", generates=True)
        em = exact_match(loaded.model, loaded.tokenizer, held_out)
        out[name] = {"exact_match": em["exact_match"], "by_task": em["by_task"], "n": em["n"]}
        print(f"{name}: exact match {em['exact_match']:.1%} {em['by_task']}", flush=True)
    return out


def torch_tokens_per_s(base: str, rank: int, alpha: float, targets: list, lr: float, batch: int, seq: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    times = []
    for _ in range(6):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times)


def peft_answers(run: Path, base: str, out_dir: Path, n: int) -> dict:
    """Greedy answers of the exported adapter in peft against jaxlm's, token by token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxlm.cli import main as jaxlm_main
    from jaxlm.data.chat import read_template, stop_ids
    from jaxlm.data.shakespeare_instructions import instruction_splits
    from jaxlm.generate import Generator
    from jaxlm.train.exact_match import prompt_and_answer
    from jaxlm.train.run_dir import load_model_dir

    assert jaxlm_main(["convert", "--to-hf", str(run), "--out", str(out_dir)]) == 0
    loaded = load_model_dir(run, what="real_finetune", generates=True)
    tok = loaded.tokenizer
    _, held_out = instruction_splits()
    template = read_template("auto", tok)
    asked = [prompt_and_answer(e, tok, template) for e in held_out[:: max(1, len(held_out) // n)][:n]]
    stops = stop_ids(tok)
    budget = max(len(tok.encode(a)) for _, a in asked) + 4
    ours = Generator(loaded.model).generate(
        [p for p, _ in asked], max_new_tokens=budget, temperature=0.0, stop_ids=stops
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(out_dir))
    same = 0
    for (prompt, _), mine in zip(asked, ours):
        with torch.no_grad():
            got = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False)[0, len(prompt) :]
        theirs = got.tolist()
        cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
        same += theirs[:cut] == mine
    print(f"peft over the exported adapter: {same}/{len(asked)} greedy answers identical to jaxlm's", flush=True)
    return {"identical": same, "asked": len(asked), "example": tok.decode(ours[0])}


def main(argv=None) -> None:
    p = real_model_parser(__doc__, "real_finetune")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--run", default=str(ROOT / "runs" / "sft_lora_smollm2"))
    p.add_argument("--answers", type=int, default=16, help="held-out prompts asked of peft and jaxlm")
    args = p.parse_args(argv)
    started = time.perf_counter()
    from jaxlm.config import load_config

    base = real_model_dir(args.model_dir)
    run = Path(args.run)
    cfg = load_config(CONFIG, [f"finetune.init_from={base}"])
    pc, tc = cfg.peft, cfg.train
    result = {"model": base, "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps}
    result["train"] = trained(run, args.steps, base)
    result["exact_match"] = exact_matches(run, base)
    targets = [f"{t}_proj" for t in pc.targets]
    torch_rate = torch_tokens_per_s(base, pc.rank, pc.alpha, targets, tc.lr, tc.batch_size, cfg.data.seq_len)
    ours = result["train"]["tokens_per_s"]
    result["tokens_per_s"] = {"jaxlm": round(ours, 1), "peft_transformers": round(torch_rate, 1)}
    result["tokens_per_s_ratio"] = round(ours / torch_rate, 3)
    print(f"training tokens/s: jaxlm {ours:.0f}, peft + transformers {torch_rate:.0f} ({ours / torch_rate:.2f}x)")
    result["peft_export"] = peft_answers(run, base, run.parent / (run.name + "_peft"), args.answers)

    em = result["exact_match"]
    tasks = list(em["lora"]["by_task"])
    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(tasks) + 1)
    for i, name in enumerate(("base", "lora")):
        values = [100 * em[name]["by_task"][t] for t in tasks] + [100 * em[name]["exact_match"]]
        axes[0].bar([v + 0.4 * i for v in x], values, 0.4, label=f"{name}")
    axes[0].set_xticks([v + 0.2 for v in x], [*tasks, "all"])
    axes[0].set_ylabel(f"held-out exact match % (n={em['lora']['n']})")
    axes[0].legend(fontsize=8)
    axes[1].bar(["jaxlm", "peft+torch"], [ours, torch_rate], color=["C0", "C1"])
    axes[1].set_ylabel("training tokens/s")
    fig.suptitle(f"LoRA r{pc.rank} on SmolLM2-135M-Instruct, {args.steps} steps of {tc.batch_size}x{cfg.data.seq_len}")
    fig.tight_layout()
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
