"""`jaxlm generate MODEL --prompt ...`: batched sampling from a run, a Hugging Face directory or a GGUF file."""

from __future__ import annotations

import sys

from jaxlm.cli.args import draft_options, number, weights_option


def add(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Continue each prompt with the latest checkpoint of RUN_DIR (prompts are batched).",
    )
    g.add_argument(
        "run_dir", help="a run directory written by `jaxlm train`, a Hugging Face model directory or a GGUF file"
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=number(float, 0.0), default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=number(int, 0), default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument(
        "--top-p", type=number(float, 0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling mass (1.0 = off)"
    )
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="sampling PRNG seed")
    weights_option(g)
    draft_options(g)
    g.set_defaults(fn=run)


def run(args) -> int:
    from jaxlm.data.chat import stop_ids
    from jaxlm.generate import Generator
    from jaxlm.quantize import default_weights, store_weights
    from jaxlm.train.run_dir import load_model_dir

    loaded = load_model_dir(args.run_dir, what="jaxlm generate", generates=True)
    store_weights(loaded.model, args.weights or default_weights(loaded.model))
    tokenizer, model, m = loaded.tokenizer, loaded.model, loaded.model.cfg
    prompts = [tokenizer.encode(p) or [tokenizer.eos_id] for p in args.prompt]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    seq2seq = bool(m.decoder_layers)
    sources = None
    if seq2seq:  # the prompt is the source; the output is the decoder's text, from its start token
        start = tokenizer.eos_id if m.decoder_start_id < 0 else m.decoder_start_id
        sources, prompts = prompts, [[start]] * len(prompts)
    draft = None
    if args.draft:
        from jaxlm.serve.model import load_draft

        draft = load_draft(args.draft, tokenizer)
    gen = Generator(model, prefix_lm=loaded.prefix_lm, draft=draft, draft_tokens=args.draft_tokens)
    outs = gen.generate(
        prompts, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids(tokenizer), sources=sources, **sampling
    )
    if draft is not None and gen.stats["drafted"]:
        s = gen.stats
        print(
            f"speculative: {s['kept']} of {s['drafted']} drafted tokens kept ({s['kept'] / s['drafted']:.0%}), "
            f"{s['steps']} model steps",
            file=sys.stderr,
        )
    for i, (text, out) in enumerate(zip(args.prompt, outs)):
        if len(outs) > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(out) if seq2seq else text + tokenizer.decode(out))
    return 0
