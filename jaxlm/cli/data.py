"""`jaxlm data prepare SOURCE --out DIR`: tokenize a corpus once into memory-mapped token files."""

from __future__ import annotations

import json

from jaxlm.cli.args import number


def add(sub) -> None:
    d = sub.add_parser("data", help="prepare a corpus: tokenized once, memory-mapped by every run")
    verbs = d.add_subparsers(dest="data_command", required=True, parser_class=type(d))
    p = verbs.add_parser(
        "prepare",
        help="tokenize a corpus into memory-mapped token files (data.source=DIR then trains on them)",
        description="Streams SOURCE (text files, a directory or glob; JSONL, .jsonl.gz/.zst, Parquet, Arrow or a "
        "`datasets` save_to_disk directory; or `shakespeare`) through a tokenizer into DIR: token ids (uint16 or "
        "uint32), document ends and an index, for the training and validation splits. Tokenizes over all cores; "
        "resumable (run it again after an interruption); DIR appears only when complete.",
    )
    p.add_argument("source", help="the corpus")
    p.add_argument("--out", required=True, help="the prepared directory to write")
    p.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe (trained on a sample of the training split), byte, or a tokenizer.json / run / HF directory",
    )
    p.add_argument("--vocab-size", type=number(int, 257), default=2048, help="bpe: the vocabulary (default 2048)")
    p.add_argument(
        "--sample-mb", type=number(float, 0, lo_open=True), default=256.0, help="bpe: MB of text it trains on"
    )
    p.add_argument("--val-fraction", type=number(float, 0, 1, lo_open=True), default=0.05)
    p.add_argument("--text-field", default="text", help="JSONL / Parquet / Arrow: the text field (default text)")
    p.add_argument("--max-bad-records", type=number(int, 0), default=100, help="malformed JSONL lines skipped at most")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from pathlib import Path

    from jaxlm.data.prepare import TextSource, prepare, train_tokenizer
    from jaxlm.data.tokenizer import load_tokenizer

    text = TextSource(args.source, args.val_fraction, args.text_field, args.max_bad_records)
    text.splits()  # a missing or empty source fails before any tokenizer is trained
    if args.tokenizer in ("bpe", "byte"):
        tokenizer = train_tokenizer(text, args.tokenizer, args.vocab_size, sample_mb=args.sample_mb)
    else:
        path = Path(args.tokenizer).expanduser()
        tokenizer = load_tokenizer(path / "tokenizer.json" if path.is_dir() else path)
    prepared = prepare(text, args.out, tokenizer, progress=not args.no_progress)
    index = prepared.index
    print(json.dumps({"out": str(prepared.path), "dtype": index["dtype"], "vocab_size": index["vocab_size"],
                      "splits": index["splits"], "seconds": index["prepare_s"]}))  # fmt: skip
    return 0
