"""`jaxlm convert`: Hugging Face and peft directories <-> run directories; GGUF files -> run directories."""

from __future__ import annotations


def add(sub) -> None:
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
    c.set_defaults(fn=run)


def run(args) -> int:
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
