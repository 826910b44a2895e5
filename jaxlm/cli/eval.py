"""`jaxlm eval RUN_DIR`: held-out loss, perplexity, bits per byte (or preference figures) and exact match."""

from __future__ import annotations

from jaxlm.cli.args import number


def add(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte of a run",
        description="Scores the latest checkpoint of RUN_DIR on its validation split.",
    )
    e.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    e.add_argument("--batches", type=number(int, 0), default=0, help="score only the first N batches (0 = whole split)")
    e.add_argument(
        "--examples",
        type=number(int, -1),
        default=0,
        help="sft runs: exact match of greedy answers on the first N held-out examples (0 = all, -1 = skip)",
    )
    e.set_defaults(fn=run)


def run(args) -> int:
    from jaxlm.train.evaluation import describe_eval, evaluate_run

    out = evaluate_run(args.run_dir, batches=args.batches, examples=None if args.examples < 0 else args.examples)
    step = out["step"]
    if "val_bpb" in out:
        print(
            f"step {step}: val loss {out['val_loss']:.4f}, perplexity {out['val_ppl']:.2f}, "
            f"bits/byte {out['val_bpb']:.4f} ({out['val_tokens']} tokens)"
        )
    else:
        print(f"step {step}: {describe_eval(out)} ({out['val_pairs']} held-out pairs)")
    if "exact_match" in out:
        em = out["exact_match"]
        tasks = ", ".join(f"{t} {v:.1%}" for t, v in em["by_task"].items())
        print(f"exact match {em['exact_match']:.1%} of {em['n']} held-out examples ({tasks})")
        for sample in em["samples"]:
            print(f"  {sample['answer'].strip()!r} (reference {sample['reference'].strip()!r})")
    return 0
