"""Bytes or BPE, and how large a vocabulary?

One model shape trained four ways with the same steps, batch and sequence length (the same tokens, so the
same compute in every layer; only the embedding and the read-out grow with the vocabulary): byte-level
(257 symbols) and byte-level BPE trained on the training split at 512, 2048 and 8192. A tokenizer that
packs more bytes into a token sees more text for the same compute: the comparison that counts is held-out
bits per byte, not loss per token. Also reports tokens per byte of the held-out text and training
throughput in tokens/s and bytes/s.

    python experiments/tokenization.py [--quick] [--steps 400]

Runs go under runs/gallery/tokenization/ (not committed). Writes experiments/results/tokenization.json and .png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import non_embedding_parameters, pyplot, save, train_variant, training_args  # noqa: E402

VOCABS = {"byte": 257, "bpe 512": 512, "bpe 2048": 2048, "bpe 8192": 8192}
QUICK_VOCABS = {"byte": 257, "bpe 320": 320, "bpe 384": 384, "bpe 512": 512}  # BPE trains in a second or two


def main(argv=None):
    args = training_args(__doc__, "tokenization", steps=400, argv=argv)
    started = time.perf_counter()

    from jaxlm.data.corpus import load_corpus
    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.flops import train_flops_per_token
    from jaxlm.nn.models import count_params
    from jaxlm.train.run_dir import RunDir

    steps = 3 if args.quick else args.steps
    rows = []
    for name, vocab in (QUICK_VOCABS if args.quick else VOCABS).items():
        kind = name.split()[0]
        run = Path(args.root) / name.replace(" ", "_")
        overrides = [f"data.tokenizer={kind}", f"model.vocab_size={vocab}"]
        trained = train_variant(run, overrides, steps=steps, quick=args.quick)
        cfg = trained.pop("config")
        tokenizer = load_tokenizer(RunDir(run).tokenizer)
        _, val = load_corpus(cfg.data.source, cfg.data.val_fraction)
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(val))
        tokens_per_byte = tokens / sum(len(text.encode("utf-8")) for text in val)
        row = {"tokenizer": name, "vocab_size": tokenizer.vocab_size, "tokens_per_byte": round(tokens_per_byte, 4)}
        row.update(parameters=count_params(cfg.model), non_embedding_parameters=non_embedding_parameters(cfg.model))
        row["train_flops_per_token"] = train_flops_per_token(cfg.model, cfg.data.seq_len)
        row.update(trained, bytes_per_s=round(trained["tokens_per_s"] / tokens_per_byte, 1))
        row["train_bytes_seen"] = round(steps * cfg.train.batch_size * cfg.data.seq_len / tokens_per_byte)
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("curve")}, flush=True)

    summary = "; ".join(
        f"{r['tokenizer']}: {r['val_bpb']:.3f} bits/byte, {r['tokens_per_byte']:.3f} tokens/byte, "
        f"{r['bytes_per_s'] / 1000:,.0f}k bytes/s"
        for r in rows
    )
    print(summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    names = [r["tokenizer"] for r in rows]
    for r in rows:
        axes[0].plot(*zip(*r["val_bpb_curve"]), "o-", label=r["tokenizer"])
    axes[0].set(title="held-out bits per byte", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [r["tokens_per_byte"] for r in rows], color="tab:gray")
    axes[1].set(title="tokens per byte (held-out text)")
    axes[2].bar(names, [r["bytes_per_s"] / 1000 for r in rows], color="tab:blue")
    axes[2].set(title="training throughput", ylabel="thousand bytes/s")
    fig.tight_layout()
    save(Path(args.out), {"steps": steps, "rows": rows, "summary": summary}, fig, started=started)


if __name__ == "__main__":
    main()
