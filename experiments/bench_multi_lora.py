"""Multi-LoRA serving on a real model: what serving M LoRA adapters on one base, in one continuous batch,
costs against serving the base alone and one adapter alone.

SmolLM2-135M-Instruct (tests/real_model.py builds it), float32, the engine `jaxlm serve` runs. M random
adapters of rank R on every projection (q, k, v, o, gate, up, down) are written as peft directories and
loaded as `jaxlm serve --adapter` does (`jaxlm.serve.adapters.attach_adapters`). Measured: decode tokens/s
of --rows greedy requests (short prompts, --new tokens each), best of --repeats rounds over the four, for
  base          the engine over the base model, no banks;
  banked, base  the engine with the banks, every row on the base (adapter 0);
  banked, mixed the rows spread over the M adapters;
  one adapter   the engine over the base with adapter 1 alone (an unmerged LoRA: serving it by itself).
Also checked: the rows of adapter 1 in the mixed batch write what "one adapter" writes.

    python experiments/bench_multi_lora.py [--adapters 4] [--rank 16] [--rows 16] [--new 64]

Writes experiments/results/bench_multi_lora.json and .png.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import bars, real_model_dir, real_model_parser, save  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours.", "Say hello."]


def engine_for(steps, rows: int):
    from jaxlm.engine import Engine

    engine = Engine(steps, slots=rows, prefix_caching=False)
    engine.warm_up(64)
    return engine


def decode_rate(engine, prompts, adapters, new: int):
    """(tokens/s of the decode steps, the requests' tokens) of greedy requests, row i on adapters[i]."""
    from jaxlm.engine import Request

    rs = [engine.submit(Request(p, new, temperature=0.0, adapter=a)) for p, a in zip(prompts, adapters)]
    while any(not r.tokens for r in rs):  # prefill, apart from the decode steps measured
        engine.step()
    done = sum(len(r.tokens) for r in rs)
    t = time.perf_counter()
    engine.run()
    return (sum(len(r.tokens) for r in rs) - done) / (time.perf_counter() - t), [r.tokens for r in rs]


def main():
    p = real_model_parser(__doc__, "bench_multi_lora")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    started = time.perf_counter()

    import jax

    from jaxlm.config import PeftConfig
    from jaxlm.engine import DecodeSteps
    from jaxlm.hf.families import architecture_for
    from jaxlm.hf.peft import load_adapter, save_adapter
    from jaxlm.peft import apply_peft, loras, take_loras
    from jaxlm.serve.adapters import attach_adapters
    from jaxlm.serve.model import load_served

    args.model_dir = real_model_dir(args.model_dir)
    served = load_served(args.model_dir)
    arch = architecture_for(served.model.cfg)
    pc = PeftConfig(method="lora", rank=args.rank, alpha=2.0 * args.rank)
    tmp = Path(tempfile.mkdtemp(prefix="multi_lora_"))
    specs = []
    for m in range(args.adapters):  # random adapters, small enough that the model still writes text
        apply_peft(served.model, pc, seed=m)
        for i, (*_, lora) in enumerate(loras(served.model)):
            lora.b.set_value(0.02 * jax.random.normal(jax.random.PRNGKey(1000 * m + i), lora.b.shape))
        save_adapter(served.model, tmp / f"a{m}", pc, arch=arch)
        take_loras(served.model)
        specs.append(f"a{m}={tmp / f'a{m}'}")

    tok = served.tokenizer
    prompts = [served.chat_prompt([{"role": "user", "content": q}]) for q in PROMPTS]
    prompts = (prompts * args.rows)[: args.rows]
    one = load_served(args.model_dir)
    load_adapter(one.model, tmp / "a0", arch=arch)
    engines = {"base": engine_for(DecodeSteps(served.model), args.rows)}
    engines["one adapter"] = engine_for(DecodeSteps(one.model), args.rows)
    attach_adapters(served, specs)
    engines["banked, base"] = engine_for(DecodeSteps(served.model), args.rows)
    engines["banked, mixed"] = engines["banked, base"]
    mixed = [1 + i % args.adapters for i in range(args.rows)]
    which = {"banked, mixed": mixed}
    rows = {k: (0.0, None) for k in engines}
    for _ in range(args.repeats):  # rounds over the four, so that the machine's drift hits each alike
        for k, engine in engines.items():
            rate, tokens = decode_rate(engine, prompts, which.get(k, [0] * args.rows), args.new)
            rows[k] = (max(rows[k][0], rate), tokens)
    same = all(rows["banked, mixed"][1][i] == rows["one adapter"][1][i] for i in range(args.rows) if mixed[i] == 1)
    same_base = rows["banked, base"][1] == rows["base"][1]
    rates = {k: round(v[0], 1) for k, v in rows.items()}
    for k, v in rates.items():
        print(f"{k:>14}: {v:7.1f} tok/s ({v / rates['base']:.2f}x base)")
    print(f"adapter-1 rows equal the adapter alone: {same}; banked base rows equal the base: {same_base}")
    print("a mixed row:", repr(tok.decode(rows["banked, mixed"][1][0])[:80]))
    result = {
        "model": args.model_dir,
        "adapters": args.adapters,
        "rank": args.rank,
        "rows": args.rows,
        "new_tokens": args.new,
        "decode_tokens_per_s": rates,
        "ratio_to_base": {k: round(v / rates["base"], 3) for k, v in rates.items()},
        "mixed_equals_alone": same,
        "banked_base_equals_base": same_base,
        "device": jax.devices()[0].device_kind,
    }
    title = f"{args.adapters} LoRA adapters (rank {args.rank}), batch {args.rows}"
    fig = bars(list(rates), list(rates.values()), ylabel="decode tokens/s (best)", title=title, size=(6, 3))
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
