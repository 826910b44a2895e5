"""Structured output on a real model: does SmolLM2-135M-Instruct write JSON that validates when asked through
`response_format`, and what do the grammar's token masks cost?

The engine `jaxlm serve` runs, float32, --rows chat requests ("Describe a character of Hamlet as JSON") at
temperature --temperature: once free (the prompt alone asks for JSON), once constrained by a JSON schema
(llguidance masks, `jaxlm.serve.structured`). Measured: the share of answers that parse and validate
(jsonschema), generated tokens/s of each run (prefill included), and the host time llguidance takes to compute one row's mask
(SmolLM2's 49,152-token vocabulary).

    python experiments/bench_structured.py [--rows 8] [--new 96]

Writes experiments/results/bench_structured.json and .png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import pyplot, real_model_dir, real_model_parser, save  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "role": {"enum": ["prince", "king", "queen", "courtier", "ghost", "soldier", "player"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "alive_at_the_end": {"type": "boolean"},
    },
    "required": ["name", "role", "age", "alive_at_the_end"],
    "additionalProperties": False,
}
CHARACTERS = ["Hamlet", "Ophelia", "Claudius", "Gertrude", "Polonius", "Horatio", "Laertes", "the Ghost"]


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main():
    p = real_model_parser(__doc__, "bench_structured")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args()
    started = time.perf_counter()

    import numpy as np

    from jaxlm.engine import DecodeSteps, Engine, Request
    from jaxlm.serve.model import load_served
    from jaxlm.serve.structured import Grammars

    args.model_dir = real_model_dir(args.model_dir)
    served = load_served(args.model_dir)
    tok = served.tokenizer
    t = time.perf_counter()
    grammars = Grammars(tok, served.cfg.vocab_size, served.stop_ids)
    grammar = grammars.grammar(SCHEMA)
    setup_s = time.perf_counter() - t
    fields = ", ".join(SCHEMA["required"])
    prompts = [
        served.chat_prompt([{"role": "user", "content": f"Describe {c} from Hamlet as a JSON object with {fields}."}])
        for c in (CHARACTERS * args.rows)[: args.rows]
    ]
    engine = Engine(DecodeSteps(served.model), slots=args.rows, prefix_caching=False)
    engine.warm_up(128)
    runs = {}
    for name in ("free", "constrained", "free", "constrained"):  # twice: the second of each is measured
        rs = [
            engine.submit(
                Request(
                    p, args.new, temperature=args.temperature, seed=i, stop_ids=served.stop_ids,
                    constraint=grammars.constraint(grammar) if name == "constrained" else None,
                )
            )
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        t = time.perf_counter()
        engine.run()
        seconds = time.perf_counter() - t
        texts = [tok.decode(r.tokens) for r in rs]
        runs[name] = {
            "tokens_per_s": round(sum(len(r.tokens) for r in rs) / seconds, 1),
            "valid": sum(valid(x) for x in texts),
            "finished": sum(r.finish_reason == "stop" for r in rs),
            "example": texts[0],
        }
    # One row's mask: llguidance's own time, along a valid answer's tokens.
    constraint = grammars.constraint(grammar)
    words = np.zeros(-(-served.cfg.vocab_size // 32), np.int32)
    answer = tok.encode(json.dumps({"name": "Hamlet", "role": "prince", "age": 30, "alive_at_the_end": False}))
    t = time.perf_counter()
    for i in answer:
        constraint.fill(words)
        constraint.accept(i)
    mask_us = (time.perf_counter() - t) / len(answer) * 1e6
    for name, r in runs.items():
        print(f"{name:>11}: {r['valid']}/{args.rows} valid, {r['finished']} finished, {r['tokens_per_s']} tok/s")
        print(f"{'':>13}{r['example'][:120]!r}")
    print(f"llguidance: {mask_us:.0f} us a row's mask; tokenizer view + schema compiled in {setup_s:.2f} s")
    result = {
        "model": args.model_dir,
        "rows": args.rows,
        "new_tokens": args.new,
        "temperature": args.temperature,
        "runs": runs,
        "mask_us_per_token": round(mask_us, 1),
        "grammar_setup_s": round(setup_s, 3),
        "schema": SCHEMA,
    }
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(7, 3))
    names = list(runs)
    ax[0].bar(names, [runs[n]["valid"] / args.rows * 100 for n in names], color=["C1", "C0"])
    ax[0].set_ylabel("answers valid against the schema (%)")
    ax[1].bar(names, [runs[n]["tokens_per_s"] for n in names], color=["C1", "C0"])
    ax[1].set_ylabel("generated tokens/s (with prefill)")
    fig.suptitle(f"SmolLM2-135M-Instruct, {args.rows} rows, T={args.temperature}", fontsize=9)
    fig.tight_layout()
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
