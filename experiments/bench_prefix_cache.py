"""Prefix caching on a real model: time to first token of a request whose prompt begins with a long prefix
(a system prompt of --prefix tokens) that an earlier request already prefilled, with and without the cache.

The engine (`jaxlm.engine.Engine`, the one `jaxlm serve` runs) on SmolLM2-135M-Instruct (tests/real_model.py
builds it), float32, one slot at a time: each measured request is alone, so its time to first token is the
prefill of what it does not find cached, plus one step. Both engines are compiled first (on another prefix).
Also checked: the first tokens of each request are the same with and without the cache (greedy).

    python experiments/bench_prefix_cache.py [--prefix 1000] [--requests 4]

Writes experiments/results/bench_prefix_cache.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import bars, real_model_dir, real_model_parser, save  # noqa: E402

QUESTIONS = ["Who is Hamlet's mother?", "What does Ophelia give away?", "Who kills Polonius?", "Where is Elsinore?"]


def first_token_seconds(engine, prompt, new: int):
    from jaxlm.engine import Request

    r = engine.submit(Request(prompt, new, temperature=0.0))
    t = time.perf_counter()
    while not r.tokens and not r.done:
        engine.step()
    ttft = time.perf_counter() - t
    engine.run()
    return ttft, r.tokens


def main():
    p = real_model_parser(__doc__, "bench_prefix_cache")
    p.add_argument("--prefix", type=int, default=1000, help="tokens of the shared system prompt")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--new", type=int, default=8)
    args = p.parse_args()
    started = time.perf_counter()

    from jaxlm.data.corpus import embedded_works
    from jaxlm.engine import DecodeSteps, Engine
    from jaxlm.serve.model import load_served

    args.model_dir = real_model_dir(args.model_dir)
    served = load_served(args.model_dir)
    tok = served.tokenizer
    play = embedded_works()["hamlet.txt"]
    system = tok.encode(play[20_000:])[: args.prefix]
    other = tok.encode(play[60_000:])[: args.prefix]

    def chat(prefix, question):
        return prefix + tok.encode("\n\nQuestion: " + question + "\nAnswer:")

    steps = DecodeSteps(served.model)
    rows = {}
    for cached in (True, False):
        engine = Engine(steps, slots=1, prefix_caching=cached)
        first_token_seconds(engine, chat(other, "warm-up"), args.new)  # compiles every shape used below
        first_token_seconds(engine, chat(other, "warm-up, again"), args.new)
        first_token_seconds(engine, chat(system, QUESTIONS[0]), args.new)  # the first sight of the prefix
        times, outputs = [], []
        for q in (QUESTIONS * args.requests)[1 : args.requests + 1]:
            t, tokens = first_token_seconds(engine, chat(system, q), args.new)
            times.append(t)
            outputs.append(tokens)
        rows[cached] = {"ttft_s": times, "outputs": outputs, "hit_tokens": engine.kv["prefix_hit_tokens"]}
        print(
            f"prefix caching {'on ' if cached else 'off'}: TTFT " + " ".join(f"{t * 1000:.0f}" for t in times) + " ms"
        )
    on, off = (min(rows[c]["ttft_s"]) for c in (True, False))
    result = {
        "model": args.model_dir,
        "prefix_tokens": len(system),
        "requests": args.requests,
        "ttft_ms": {"cached": round(on * 1000, 1), "uncached": round(off * 1000, 1)},
        "ratio": round(on / off, 3),
        "same_outputs": rows[True]["outputs"] == rows[False]["outputs"],
        "cached_hit_tokens": rows[True]["hit_tokens"],
    }
    print(result)
    fig = bars(
        ["prefix caching off", "prefix caching on"], [off * 1000, on * 1000],
        ylabel="time to first token (ms, best)", title=f"{len(system)}-token shared prefix: {result['ratio']}x",
    )  # fmt: skip
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
