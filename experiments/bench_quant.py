"""Weight-only quantized inference on a real model: `--weights bf16|int8|nf4` against float32, in one run.

float32 is measured two ways: `f32`, the float32 weights in the CPU kernels' strips (what `jaxlm generate|serve`
store on CPU by default, `jaxlm.quantize.default_weights`), the reference of every ratio; and `stored`, the
model's own float32 arrays, multiplied by XLA's dot.

The model: SmolLM2-135M-Instruct (tests/real_model.py builds it once a machine). For each way of storing the
weights (`jaxlm.quantize.store_weights`) the same model is loaded and measured:

- decode tokens/s of the engine at batch 1 and 16 (greedy chat prompts, --new tokens, prefill excluded; the
  best of --repeats rounds, taken over the kinds in turn so the machine's drift hits each alike);
- perplexity on held-out text: --ppl-windows windows of 512 tokens of the embedded corpus' last work;
- greedy agreement with float32 on 16 chat prompts: answers identical, and the share of tokens before the
  first difference;
- bytes per parameter of the stored weights.

    python experiments/bench_quant.py [--weights f32 stored bf16 int8 nf4] [--new 64] [--repeats 3]

Writes experiments/results/bench_quant.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_decode import QUESTIONS  # noqa: E402
from gallery import pyplot, real_model_dir, real_model_parser, save  # noqa: E402

WINDOW = 512


def held_out_windows(tok, windows: int) -> list[list[int]]:
    from jaxlm.data.corpus import embedded_works

    works = embedded_works()
    ids = tok.encode(works[sorted(works)[-1]])
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(windows)]


def perplexity(model, windows) -> float:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def nll(tokens):
        logits = model(tokens[None, :-1])[0][0].astype(jnp.float32)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1))

    total = sum(float(nll(jnp.asarray(w))) for w in windows)
    return float(np.exp(total / sum(len(w) - 1 for w in windows)))


def decode_rate(engine, prompts, new: int):
    """(decode tokens/s, tokens) of greedy requests, the prefill apart."""
    from jaxlm.engine import Request

    rs = [engine.submit(Request(p, new, temperature=0.0)) for p in prompts]  # no stop ids: every row runs --new
    while any(not r.tokens for r in rs):
        engine.step()
    done = sum(len(r.tokens) for r in rs)
    t = time.perf_counter()
    engine.run()
    return (sum(len(r.tokens) for r in rs) - done) / (time.perf_counter() - t), [r.tokens for r in rs]


def agreement(tokens, reference) -> dict:
    same = sum(a == b for a, b in zip(tokens, reference))
    prefix = []
    for a, b in zip(tokens, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    return {
        "identical_answers": f"{same}/{len(reference)}",
        "tokens_before_first_difference": round(float(np.mean(prefix)), 4),
    }


def main(argv=None) -> None:
    p = real_model_parser(__doc__, "bench_quant")
    p.add_argument("--weights", nargs="+", default=["f32", "stored", "bf16", "int8", "nf4"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--context", type=int, default=1024, help="the model's max_seq_len here (KV cache size)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    import dataclasses

    import jax

    from jaxlm import kernels
    from jaxlm.data.chat import render
    from jaxlm.engine import DecodeSteps, Engine
    from jaxlm.hf import from_hf
    from jaxlm.quantize import store_weights, weight_bytes

    args.model_dir = real_model_dir(args.model_dir)
    models = {}
    for w in args.weights:
        model, tok, _ = from_hf(args.model_dir)
        model.cfg = dataclasses.replace(model.cfg, max_seq_len=args.context)
        models[w] = store_weights(model, w)
    chat = lambda q: render(  # noqa: E731
        tok.chat_template, [{"role": "user", "content": q}], add_generation_prompt=True, **tok.special_tokens
    )
    prompts = [tok.encode(chat(q)) for q in QUESTIONS]
    windows = held_out_windows(tok, args.ppl_windows)
    result = {"model": args.model_dir, "kernels": kernels.available(), "device": jax.devices()[0].device_kind}
    rows = {
        w: {"bytes_per_param": round(weight_bytes(m)["bytes"] / weight_bytes(m)["params"], 3)}
        for w, m in models.items()
    }
    for w, m in models.items():
        rows[w]["perplexity"] = round(perplexity(m, windows), 4)
        print(f"{w:>5}: perplexity {rows[w]['perplexity']:.3f}, {rows[w]['bytes_per_param']} bytes/param", flush=True)
    tokens = {}
    for B in args.batches:
        # Each batch size's engines compile only the shapes these prompts use (an untimed first round), and
        # are dropped with their programs before the next: five models' worth of warmed-up programs exceed
        # Linux's default 65,530 memory maps (XLA:CPU maps each compiled kernel), and LLVM then fails.
        jax.clear_caches()
        steps = {w: DecodeSteps(m) for w, m in models.items()}
        engines = {w: Engine(steps[w], slots=B, prefix_caching=False) for w in args.weights}
        for engine in engines.values():
            decode_rate(engine, (prompts * B)[:B], 2)
        best = dict.fromkeys(args.weights, 0.0)
        for _ in range(args.repeats):
            for w, engine in engines.items():
                rate, out = decode_rate(engine, (prompts * B)[:B], args.new)
                best[w] = max(best[w], rate)
                if B == max(args.batches):
                    tokens[w] = out
        for w in args.weights:
            rows[w][f"decode_b{B}"] = round(best[w], 2)
            print(f"{w:>5}: batch {B}: {best[w]:.1f} tok/s ({best[w] / best[args.weights[0]]:.2f}x)", flush=True)
    base = args.weights[0]
    for w in args.weights:
        for B in args.batches:
            rows[w][f"speedup_b{B}"] = round(rows[w][f"decode_b{B}"] / rows[base][f"decode_b{B}"], 3)
        rows[w]["perplexity_vs_f32"] = round(rows[w]["perplexity"] / rows[base]["perplexity"] - 1, 5)
        rows[w]["greedy"] = agreement(tokens[w], tokens[base])
        print(w, rows[w], flush=True)
    result |= {"new_tokens": args.new, "prompts": len(QUESTIONS), "ppl_tokens": sum(map(len, windows)), "rows": rows}

    fig, axes = pyplot().subplots(1, 2, figsize=(8, 3))
    x = np.arange(len(args.weights))
    for i, B in enumerate(args.batches):
        axes[0].bar(x + 0.4 * i, [rows[w][f"decode_b{B}"] for w in args.weights], 0.4, label=f"batch {B}")
    axes[0].set_xticks(x + 0.2, args.weights)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend(fontsize=8)
    axes[1].bar(args.weights, [rows[w]["perplexity"] for w in args.weights], color=[f"C{i}" for i in x])
    axes[1].set_ylabel(f"held-out perplexity ({result['ppl_tokens']} tokens)")
    fig.suptitle(f"SmolLM2-135M-Instruct: weights stored as {', '.join(args.weights)} (jaxlm --weights)", fontsize=9)
    fig.tight_layout()
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
