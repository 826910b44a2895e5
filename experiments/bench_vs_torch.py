"""jaxlm against Hugging Face transformers on torch, side by side in one run, same model, same weights.

For each config: jaxlm builds and initialises the model, `jaxlm.hf.to_hf` writes it to a
temporary directory and transformers loads it, so both sides start from identical weights.
Then, on this machine:

- training tokens/s: the same random batch, AdamW with the config's settings (lr, betas, eps,
  weight decay on matrices, global-norm clipping) in both; the first step's losses are compared
  to show the two compute the same function;
- greedy decode tokens/s at batch 1 and batch 16 (prompt of 16 tokens, --new tokens, no early
  stop): jaxlm `Generator` against `model.generate(do_sample=False)`; the tokens are compared.

torch runs eager, and with `--compile` also `torch.compile` (inductor; needs a C++ compiler) as
the stronger baseline. torch is optional: `pip install torch==2.13.0 && pip install -e ".[parity]"`.

    python experiments/bench_vs_torch.py                       # llama_tiny, gpt_tiny, gpt2_124m @ T=128
    python experiments/bench_vs_torch.py --configs llama_tiny --steps 5 --new 64
    python experiments/bench_vs_torch.py --compile              # adds torch.compile figures

Writes experiments/results/bench_vs_torch.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import load_config
from jaxlm.generate import Generator
from jaxlm.hf.io import to_hf
from jaxlm.nn.models import count_params
from jaxlm.train.sharded import ShardedTraining

ROOT = Path(__file__).resolve().parent.parent
# name -> (config file, overrides): the ~100M-parameter entry is GPT-2 small's shape at a short sequence.
CONFIGS = {
    "llama_tiny": ("configs/llama_tiny.yaml", []),
    "gpt_tiny": ("configs/gpt_tiny.yaml", []),
    "gpt2_124m": (
        None,  # the preset alone (a YAML model section would override its shape)
        ["model.preset=gpt2_124m", "train.batch_size=8", "data.seq_len=128", "data.tokenizer=byte"],
    ),
}


def timed(fn, steps: int) -> float:
    """Best-of-two mean seconds per call of fn() over `steps` calls (fn blocks until done)."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def jax_train(cfg, batch_np: dict, steps: int):
    sharded = ShardedTraining(cfg)
    state = sharded.init_state()
    # The initial weights (a device copy: the train step donates the state's buffers).
    model = nnx.merge(sharded.graphdef, jax.tree.map(jnp.copy, state.params), state.frozen)
    batch = sharded.put_batch(batch_np)
    box = {"state": state}
    first = {}

    def step():
        box["state"], m = sharded.train_step(box["state"], batch)
        jax.block_until_ready(m)
        first.setdefault("loss", float(m["loss"]))

    t = time.perf_counter()
    step()  # compile
    compile_s = time.perf_counter() - t
    return model, first["loss"], timed(step, steps), compile_s


def torch_model(model, directory: Path):
    import torch
    from transformers import AutoModelForCausalLM

    to_hf(model, directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")


def torch_train(hf_model, tc, batch_np: dict, steps: int, compile: bool):
    import torch

    model = hf_model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(tc.b1, tc.b2),
        eps=tc.eps,
    )
    inputs = torch.from_numpy(batch_np["inputs"]).long()
    targets = torch.from_numpy(batch_np["targets"]).long()
    forward = model
    if compile:
        forward = torch.compile(model)
    model.train()
    first = {}

    def step():
        logits = forward(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        first.setdefault("loss", float(loss))

    t = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t
    return first["loss"], timed(step, steps), compile_s


def jax_decode(model, prompts, new: int):
    gen = Generator(model)
    out = {}

    def once():
        out["tokens"] = gen.generate(prompts, max_new_tokens=new, temperature=0.0)

    once()  # compile
    return out["tokens"], timed(once, 1)


def torch_decode(hf_model, prompts, new: int, compile: bool = False):
    import torch

    hf_model.eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    if compile:
        kw["cache_implementation"] = "static"
        hf_model.forward = torch.compile(hf_model.forward, mode="reduce-overhead")
    out = {}

    def once():
        with torch.inference_mode():
            out["tokens"] = hf_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, ids.shape[1] :]

    once()  # warm-up (and compile)
    return out["tokens"].tolist(), timed(once, 1)


def bench(name: str, args) -> dict:
    path, overrides = CONFIGS[name]
    cfg = load_config(path and ROOT / path, [*overrides, *args.overrides])
    mc, tc = cfg.model, cfg.train
    B, T = tc.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, mc.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    row = {"config": name, "params": count_params(mc), "batch": B, "seq_len": T}

    model, jax_loss, jax_s, jax_compile = jax_train(cfg, batch, args.steps)
    row.update(jaxlm_train_tok_s=round(B * T / jax_s), jaxlm_compile_s=round(jax_compile, 1))
    with tempfile.TemporaryDirectory() as d:
        hf = torch_model(model, Path(d))
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch_loss, torch_s, _ = torch_train(hf, tc, batch, args.steps, compile=False)
    row.update(
        torch_eager_train_tok_s=round(B * T / torch_s),
        first_loss_jaxlm=round(jax_loss, 5),
        first_loss_torch=round(torch_loss, 5),
        train_ratio_vs_eager=round(torch_s / jax_s, 2),
    )
    if args.compile:
        hf.load_state_dict(state)
        try:
            _, compiled_s, compile_s = torch_train(hf, tc, batch, args.steps, compile=True)
            row.update(
                torch_compile_train_tok_s=round(B * T / compiled_s),
                torch_compile_s=round(compile_s, 1),
                train_ratio_vs_compile=round(compiled_s / jax_s, 2),
            )
        except Exception as e:  # inductor needs a working C++ toolchain; report, do not fail the table
            row["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    hf.load_state_dict(state)  # decode from the same (initial) weights as jaxlm's model

    for b in args.decode_batches:
        prompts = [[(7 * i + 3 + 11 * r) % mc.vocab_size for i in range(16)] for r in range(b)]
        jt, js = jax_decode(model, prompts, args.new)
        tt, ts = torch_decode(hf, prompts, args.new)
        row[f"decode_b{b}_jaxlm_tok_s"] = round(b * args.new / js, 1)
        row[f"decode_b{b}_torch_tok_s"] = round(b * args.new / ts, 1)
        row[f"decode_b{b}_ratio"] = round(ts / js, 2)
        # Greedy ties and float-rounding can part the two after many tokens; report the agreement.
        first = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a)) for a, c in zip(jt, tt)]
        row[f"decode_b{b}_identical"] = jt == tt
        row[f"decode_b{b}_first_difference"] = min(first)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=10, help="timed training steps per repetition")
    p.add_argument("--new", type=int, default=200, help="greedy tokens to decode")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--out", default=str(ROOT / "experiments/results/bench_vs_torch.json"))
    p.add_argument("overrides", nargs="*", help="overrides applied to every config, e.g. train.precision=bf16")
    args = p.parse_args()
    import torch
    import transformers

    rows = [bench(name, args) for name in args.configs]
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "overrides": args.overrides,
    }
    keys = [k for k in rows[0] if k not in ("config",)]
    print(f"{'':>30} " + " ".join(f"{r['config']:>14}" for r in rows))
    for k in keys:
        print(f"{k:>30} " + " ".join(f"{str(r.get(k, '')):>14}" for r in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(json.dumps({"meta": meta, "rows": rows}))


if __name__ == "__main__":
    main()
