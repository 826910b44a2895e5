"""Command line: `jaxlm train | generate | serve | eval | plan | convert | data`, one module a verb (its arguments and
its `run`). Run `jaxlm COMMAND --help`. A verb imports what it uses when it runs, so `--help` and argument
errors answer without importing JAX."""

from __future__ import annotations

import argparse
import sys

from jaxlm.cli import convert, data, generate, plan, serve, train
from jaxlm.cli import eval as eval_verb  # the module of `jaxlm eval`, not the builtin
from jaxlm.cli.args import Parser, quiet_logs

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
  jaxlm data prepare corpus/*.jsonl.zst --out data/corpus --vocab-size 32000   (then data.source=data/corpus)
"""

VERBS = (train, generate, serve, eval_verb, convert, plan, data)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="jaxlm",
        description="Train, evaluate and sample language models written in JAX/Flax NNX.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for verb in VERBS:
        verb.add(sub)
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
    quiet_logs()
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
