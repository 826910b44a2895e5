"""Command line: `jaxlm train | generate | serve | eval | plan | convert`. Run `jaxlm COMMAND --help`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXAMPLES = """examples:
  jaxlm train configs/llama_tiny.yaml
  jaxlm train configs/gpt_tiny.yaml model.num_layers=2 train.steps=100 train.run_dir=runs/quick
  jaxlm generate runs/llama_tiny --prompt "ROMEO." --max-new-tokens 200 --temperature 0.8
  jaxlm serve runs/sft_lora --port 8000 --slots 16     (OpenAI-compatible: /v1/chat/completions)
  jaxlm eval runs/llama_tiny
  jaxlm convert --from-hf ~/models/Qwen2-0.5B --out runs/qwen2   (then generate / eval / train)
  jaxlm convert --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2   (llama.cpp's files, dequantized)
  jaxlm convert --to-hf runs/llama_tiny --out hf/llama_tiny
  jaxlm convert --to-hf runs/sft_lora --out hf/sft_lora_adapter      (a peft adapter; --merge: full weights)
  jaxlm plan configs/llama_tiny.yaml model.preset=llama2_7b mesh.fsdp=4 mesh.tensor=2 --devices 8
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one `error:` line (plus where to look), before anything runs."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _number(kind, lo=None, hi=None, *, lo_open=False, what=None):
    """An argparse type: kind (int/float) within [lo, hi] ((lo, hi] with lo_open), with a message naming the bound."""
    low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    high = "" if hi is None else f"<= {hi}"
    rule = what or " and ".join(b for b in (low, high) if b)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            value != value
            or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and value > hi)
        ):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text!r}")
    return text


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def cmd_train(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.train.trainer import train

    cfg = load_config(args.config, args.overrides)  # config errors before joining other processes
    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None:
        from jaxlm.parallel.distributed import initialize
        from jaxlm.parallel.supervise import run_supervised, supervised

        if not supervised():  # the work runs in a child, so a peer's death is reported in words
            env = lambda name: int(os.environ[name]) if os.environ.get(name, "").isdigit() else None  # noqa: E731
            pid = args.process_id if args.process_id is not None else env("JAXLM_PROCESS_ID")
            n = args.num_processes if args.num_processes is not None else env("JAXLM_NUM_PROCESSES")
            return run_supervised(args.argv, pid, n)

        initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)
    print(f"training {args.config} -> {cfg.train.run_dir}", file=sys.stderr)
    out = train(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    if out["interrupted"] is not None:
        print(
            f"stopped by signal {out['interrupted']} at step {out['step']}; checkpoint saved in "
            f"{cfg.train.run_dir}; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + int(out["interrupted"])
    line = f"step {out['step']} in {out['elapsed_s']:.0f} s"
    if "val_bpb" in out:
        line += f": val loss {out['val_loss']:.4f}, ppl {out['val_ppl']:.2f}, bits/byte {out['val_bpb']:.4f}"
    print(line)
    return 0


def cmd_generate(args) -> int:
    from jaxlm.data.chat import stop_ids
    from jaxlm.generate import Generator
    from jaxlm.train.run_dir import load_model_dir

    loaded = load_model_dir(args.run_dir, what="jaxlm generate", generates=True)
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


def cmd_serve(args) -> int:
    from jaxlm.serve.model import load_draft, load_served
    from jaxlm.serve.server import build_service, check_address, serve

    check_address(args.host, args.port)
    served = load_served(args.model_dir, args.name)
    service = build_service(
        served,
        slots=args.slots,
        chunk=args.chunk,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        draft=load_draft(args.draft, served.tokenizer) if args.draft else None,
        draft_tokens=args.draft_tokens,
        kv_tokens=args.kv_tokens,
        warm_up_tokens=args.warm_up_tokens,
    )
    print(f"serving {served.name!r} on http://{args.host}:{args.port}/v1 ({args.slots} slots)", flush=True)
    serve(service, host=args.host, port=args.port, grace=args.grace)
    return 0


def cmd_eval(args) -> int:
    import dataclasses
    import math

    import jax
    from flax import nnx

    from jaxlm.config import RL_OBJECTIVES, ConfigError, MeshConfig
    from jaxlm.train.data import load_splits, make_batches
    from jaxlm.train.run_dir import base_params_for, load_run
    from jaxlm.train.sharded import ShardedTraining
    from jaxlm.train.step import split_model
    from jaxlm.train.trainer import describe_eval, evaluate

    cfg, tokenizer, model, step = load_run(args.run_dir)
    if cfg.train.objective in RL_OBJECTIVES:
        raise ConfigError(
            f"a {cfg.train.objective} run evaluates while it trains: its held-out reward and KL are the val_reward and "
            f"val_kl lines of {args.run_dir}/metrics.jsonl (before the first step and every train.eval_every steps)"
        )
    _, val = load_splits(cfg)
    _, val_batches = make_batches(cfg, tokenizer, None, val)
    # Training's sharded evaluation on this machine's devices (the run's own mesh may not fit here).
    mesh = MeshConfig(data=math.gcd(cfg.train.batch_size, jax.device_count()))
    sharded = ShardedTraining(dataclasses.replace(cfg, mesh=mesh), mask_id=getattr(tokenizer, "mask_id", None))
    _, params, frozen = split_model(model, sharded.trainable)
    ref = base_params_for(cfg) if sharded.reference == "copy" else nnx.State({})  # DPO's reference: its start
    shardings = (sharded.shardings.params, sharded.shardings.frozen, sharded.shardings.ref)
    weights = jax.device_put((params, frozen, ref), shardings)
    eval_step = sharded.eval_step(tokenizer.token_bytes)
    out = evaluate(eval_step, weights, val_batches(args.batches), put=lambda b: sharded.put_batch(b, lo=0))
    if "val_bpb" in out:
        print(
            f"step {step}: val loss {out['val_loss']:.4f}, perplexity {out['val_ppl']:.2f}, "
            f"bits/byte {out['val_bpb']:.4f} ({out['val_tokens']} tokens)"
        )
    else:
        print(f"step {step}: {describe_eval(out)} ({out['val_pairs']} held-out pairs)")
    if cfg.train.objective in ("sft", "prefix_lm") and args.examples >= 0:
        from jaxlm.train.exact_match import exact_match

        examples = val[: args.examples] if args.examples else val
        prefix_lm = cfg.train.objective == "prefix_lm"
        em = exact_match(model, tokenizer, examples, chat_template=cfg.data.chat_template, prefix_lm=prefix_lm)
        tasks = ", ".join(f"{t} {v:.1%}" for t, v in em["by_task"].items())
        print(f"exact match {em['exact_match']:.1%} of {em['n']} held-out examples ({tasks})")
        for sample in em["samples"]:
            print(f"  {sample['answer'].strip()!r} (reference {sample['reference'].strip()!r})")
    return 0


def cmd_plan(args) -> int:
    from jaxlm.config import load_config
    from jaxlm.plan import plan

    print(plan(load_config(args.config, args.overrides), args.devices, compiled=args.compiled))
    return 0


def cmd_convert(args) -> int:
    from jaxlm.config import ConfigError

    if args.from_gguf:
        from jaxlm.hf.convert import gguf_to_run

        if args.merge or args.base:
            raise ConfigError("--merge and --base are not for --from-gguf")
        arch = gguf_to_run(args.from_gguf, args.out)
        print(f"{args.from_gguf} ({arch}) -> run directory {args.out} (checkpoint 0)")
    elif args.from_hf:
        from jaxlm.hf.convert import hf_to_run

        if args.merge:
            raise ConfigError("--merge is for --to-hf (writing a LoRA run as full weights)")
        arch, step = hf_to_run(args.from_hf, args.out, base=args.base)
        print(f"{args.from_hf} ({arch}) -> run directory {args.out} (checkpoint {step})")
    else:
        from jaxlm.hf.convert import run_to_hf

        if args.base:
            raise ConfigError("--base is for --from-hf with a peft adapter directory")
        arch = run_to_hf(args.to_hf, args.out, merge=args.merge)
        print(f"{args.to_hf} -> {arch} in {args.out}")
    return 0


def _draft_options(p) -> None:
    p.add_argument(
        "--draft",
        metavar="RUN_DIR|HF_DIR|ngram",
        help="speculative decoding: a smaller model with the same tokenizer drafts tokens the model verifies "
        "(the same greedy output, the same sampling distribution), or ngram: prompt lookup",
    )
    p.add_argument("--draft-tokens", type=_number(int, 1, 16), default=4, help="tokens drafted per step (4)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxlm",
        description="Train, evaluate and sample language models written in JAX/Flax NNX.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a model (resumes if the run directory has checkpoints)",
        description="Train the model of CONFIG on its data. Re-running the same command resumes from the "
        "latest checkpoint in train.run_dir; SIGTERM or Ctrl-C saves a checkpoint before exiting.",
        epilog="overrides are dotted key=value pairs, e.g. model.num_layers=2 train.steps=100 data.source=my.txt",
    )
    t.add_argument("config", help="YAML config, e.g. configs/llama_tiny.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument(
        "--stop-after", type=_number(int, 1), default=None, metavar="STEP", help="stop (with a checkpoint) at this step"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = t.add_argument_group(
        "multi-process (multi-host)",
        "run the same command in every process; without these flags JAXLM_COORDINATOR, JAXLM_NUM_PROCESSES and "
        "JAXLM_PROCESS_ID are read when --distributed is given, else the cluster (SLURM, MPI, TPU) is detected",
    )
    d.add_argument("--distributed", action="store_true", help="join a multi-process run")
    d.add_argument(
        "--coordinator", type=_address, metavar="HOST:PORT", help="address of process 0's coordination service"
    )
    d.add_argument("--num-processes", type=_number(int, 1), help="number of processes in the run")
    d.add_argument("--process-id", type=_number(int, 0), help="this process's index, 0 .. N-1")
    d.add_argument(
        "--heartbeat-timeout",
        type=_number(int, 1),
        default=30,
        metavar="S",
        help="fail when a peer is silent this long (30)",
    )
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Continue each prompt with the latest checkpoint of RUN_DIR (prompts are batched).",
    )
    g.add_argument(
        "run_dir", help="a run directory written by `jaxlm train`, a Hugging Face model directory or a GGUF file"
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", type=_number(int, 1), default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=_number(float, 0.0), default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=_number(int, 0), default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument(
        "--top-p", type=_number(float, 0.0, 1.0, lo_open=True), default=1.0, help="nucleus sampling mass (1.0 = off)"
    )
    g.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="sampling PRNG seed")
    _draft_options(g)
    g.set_defaults(fn=cmd_generate)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (continuous batching, SSE streaming)",
        description="Serves the latest checkpoint of RUN_DIR (a PEFT run with its adapters) or a Hugging Face "
        "model directory: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the run's chat "
        "template; stream=true for server-sent events), GET /health. SIGTERM stops accepting, lets requests in "
        "flight finish for --grace seconds, cancels the rest and exits.",
    )
    sv.add_argument(
        "model_dir",
        metavar="RUN_DIR|HF_DIR|GGUF",
        help="a jaxlm run directory, a Hugging Face directory or a GGUF file",
    )
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=_number(int, 1, 65535), default=8000, help="port (default 8000)")
    sv.add_argument("--slots", type=_number(int, 1), default=8, help="sequences decoded together (default 8)")
    sv.add_argument(
        "--chunk", type=_number(int, 1), default=64, help="prompt tokens prefilled per slot per step (default 64)"
    )
    sv.add_argument(
        "--max-queue", type=_number(int, 0), default=None, help="requests waiting for a slot (default 4 x slots)"
    )
    sv.add_argument(
        "--queue-timeout",
        type=_number(float, 0.0),
        default=30.0,
        metavar="S",
        help="longest wait for a slot before a 503 (default 30)",
    )
    sv.add_argument(
        "--grace", type=_number(float, 0.0), default=10.0, metavar="S", help="shutdown: time for requests to finish"
    )
    sv.add_argument(
        "--kv-tokens",
        type=_number(int, 1),
        default=None,
        metavar="N",
        help="KV cache budget in tokens, over all slots (default: every slot's full context); the cache grows "
        "as it is used, and a request whose tokens do not fit waits for a slot",
    )
    sv.add_argument(
        "--warm-up-tokens",
        type=_number(int, 1),
        default=256,
        metavar="N",
        help="compile the steps for rows of up to N tokens before listening (default 256; longer rows compile "
        "their shapes when they first occur)",
    )
    sv.add_argument("--name", help="the model id clients ask for (default: the directory name)")
    _draft_options(sv)
    sv.set_defaults(fn=cmd_serve)

    e = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte of a run",
        description="Scores the latest checkpoint of RUN_DIR on its validation split.",
    )
    e.add_argument("run_dir", help="a run directory written by `jaxlm train`")
    e.add_argument(
        "--batches", type=_number(int, 0), default=0, help="score only the first N batches (0 = whole split)"
    )
    e.add_argument(
        "--examples",
        type=_number(int, -1),
        default=0,
        help="sft runs: exact match of greedy answers on the first N held-out examples (0 = all, -1 = skip)",
    )
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser(
        "convert",
        help="Hugging Face model / peft adapter directory <-> jaxlm run directory; GGUF file -> run directory",
        description="--from-hf DIR: config.json, model.safetensors (or shards) and tokenizer.json become a run "
        "directory that `jaxlm generate`, `eval` and `train` (continued training) use; a peft adapter directory "
        "(adapter_config.json + adapter_model.safetensors: LoRA, prompt or prefix tuning) becomes a PEFT run on "
        "its base (--base, default the adapter's base_model_name_or_path). --to-hf RUN_DIR: the latest "
        "checkpoint becomes a directory transformers loads; a PEFT run's becomes a peft adapter directory "
        "(`PeftModel.from_pretrained(base, DIR)`), or with --merge its LoRA merged into full weights. "
        "Families: LLaMA, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-2, BERT, T5. --from-gguf FILE: a llama.cpp "
        "GGUF file (LLaMA, Qwen2, Qwen3; every tensor type the gguf package dequantizes) becomes a float32 run "
        "directory, its tokenizer and chat template rebuilt from the file.",
    )
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="a local Hugging Face model directory")
    way.add_argument("--from-gguf", metavar="FILE", help="a GGUF file (llama.cpp)")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="a jaxlm run directory")
    c.add_argument("--out", required=True, help="directory to create")
    c.add_argument("--base", metavar="DIR", help="--from-hf ADAPTER_DIR: the base model (HF or jaxlm run directory)")
    c.add_argument("--merge", action="store_true", help="--to-hf of a LoRA/QLoRA run: full merged weights")
    c.set_defaults(fn=cmd_convert)

    pl = sub.add_parser(
        "plan",
        help="print how a config's training shards over the mesh, and memory per device",
        description="Without allocating anything: the sharding of every parameter and the per-device bytes of "
        "parameters, gradients, optimizer state and (estimated) activations.",
    )
    pl.add_argument("config", help="YAML config")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. mesh.fsdp=8)")
    pl.add_argument(
        "--devices", type=_number(int, 1), default=None, help="plan for this many devices (default: those present)"
    )
    pl.add_argument(
        "--compiled",
        action="store_true",
        help="also compile the train step on the devices present and compare with XLA's memory analysis",
    )
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may also follow the options (`jaxlm plan CFG --devices 8 mesh.fsdp=8`).
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _quiet_logs()
    from jaxlm.config import ConfigError
    from jaxlm.data.tokenizer import DataError

    try:
        return args.fn(args)
    # OSError: a path that cannot be read or written (permissions, a file where a directory should be).
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
