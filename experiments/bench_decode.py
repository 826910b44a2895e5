"""How much does the KV cache speed up generation?

Generates NEW tokens greedily from a random-initialised (or trained, --run-dir)
model twice: with the KV cache (`Generator`: prefill, then one jitted decode
step per token) and by recomputing the whole context for every token
(`generate_uncached`: every step runs the model over the context padded to
max_seq_len, so it compiles once). Prints tokens/s of each and their ratio,
measured in the same run; compilation is excluded.

    python experiments/bench_decode.py configs/llama_tiny.yaml [overrides] [--new 256] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import time

from flax import nnx

from jaxlm.config import load_config
from jaxlm.generate import Generator, generate_uncached
from jaxlm.nn.transformer import TransformerLM


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together by the cached generator")
    p.add_argument("--run-dir", default=None, help="use a trained run's model instead of a random one")
    args = p.parse_args()

    if args.run_dir:
        from jaxlm.train.run_dir import load_run

        cfg, _, model, _ = load_run(args.run_dir)
    else:
        cfg = load_config(args.config, args.overrides)
        model = TransformerLM(cfg.model, rngs=nnx.Rngs(0))
    prompt = [(7 * i + 3) % cfg.model.vocab_size for i in range(args.prompt_len)]

    gen = Generator(model)
    gen.generate([prompt] * args.batch, max_new_tokens=args.new, temperature=0.0)  # compile
    t = time.perf_counter()
    cached = gen.generate([prompt] * args.batch, max_new_tokens=args.new, temperature=0.0)
    cached_s = time.perf_counter() - t

    generate_uncached(model, prompt, max_new_tokens=2)  # compile
    t = time.perf_counter()
    ref = generate_uncached(model, prompt, max_new_tokens=args.new)
    uncached_s = time.perf_counter() - t

    out = {
        "config": args.config,
        "max_seq_len": cfg.model.max_seq_len,
        "new_tokens": args.new,
        "batch": args.batch,
        "same_tokens": cached[0] == ref,
        "cached_tokens_per_s": round(args.batch * args.new / cached_s, 1),
        "cached_ms_per_step": round(cached_s / args.new * 1e3, 2),
        "uncached_tokens_per_s": round(args.new / uncached_s, 1),
        # Tokens/s ratio; with --batch B the cached side decodes B sequences at once.
        "cached_vs_uncached_tokens_per_s": round((args.batch * args.new / cached_s) / (args.new / uncached_s), 2),
    }
    for k, v in out.items():
        print(f"{k:>22}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
