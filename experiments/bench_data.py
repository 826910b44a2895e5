"""Data at scale: prepare throughput, time to the first step, memory and loader speed on a generated corpus.

One run, on a corpus of --mb MB written in each format (text files, JSONL, JSONL.zst, Parquet), made of
the embedded Shakespeare lines shuffled into documents of 2-60 KB:

- prepare: `jaxlm data prepare` of each format (a subprocess each, so its peak RSS is its own), MB/s of
  text, against `tokenizers`' own batch-encoding throughput on the same documents (in memory, the same cores,
  the same 8 MB batches): the cost of streaming, decoding, writing and committing;
- training on the prepared directory: wall time from `jaxlm train` until its first step is logged (import, map
  the files, compile, one step), and from the rerun until its next step (a resume); then SIGTERM; the peak RSS
  of each;
- the loader: tokens/s that `PackedLoader` serves from the mapped files, against the tokens/s that training
  consumes here (the median of a 12-step run's last five steps);
- memory flat in corpus size: the same first step on a synthetic prepared directory of --flat-gb GB of text
  (random ids at the corpus's bytes per token).

    python experiments/bench_data.py [--mb 1024] [--formats text jsonl jsonl.zst parquet] [--vocab 8192]

The BPE (--vocab) is trained once, on a 16 MB sample, and used for every format. Writes
experiments/results/bench_data.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import RESULTS, commit, pyplot, save  # noqa: E402

TRAIN = ["model.vocab_size=8192", "data.seq_len=128", "train.batch_size=16", "train.eval_every=0",
         "train.ckpt_every=1", "train.eval_batches=1", "train.log_every=1"]  # fmt: skip


def documents(mb: float, seed: int = 0):
    """Documents of shuffled Shakespeare lines, 2-60 KB each, until `mb` MB."""
    from jaxlm.data.corpus import embedded_works

    lines = [ln for text in embedded_works().values() for ln in text.splitlines() if ln.strip()]
    rng = random.Random(seed)
    total, budget = 0, int(mb * 2**20)
    while total < budget:
        n = rng.randint(60, 1800)
        doc = "\n".join(lines[rng.randrange(len(lines))] for _ in range(n))
        total += len(doc)
        yield doc


def write_corpus(root: Path, mb: float, formats: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    out = {f: root / f for f in formats}
    for p in out.values():
        p.mkdir(exist_ok=True)
    shard, rows, size = 0, [], 0

    def flush():
        nonlocal shard, rows, size
        if not rows:
            return
        name = f"{shard:05d}"
        if "text" in out:
            for i, d in enumerate(rows):
                (out["text"] / f"{name}-{i:05d}.txt").write_text(d)
        raw = "".join(json.dumps({"text": d}) + "\n" for d in rows).encode()
        if "jsonl" in out:
            (out["jsonl"] / f"{name}.jsonl").write_bytes(raw)
        if "jsonl.zst" in out:
            (out["jsonl.zst"] / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
        if "parquet" in out:
            pq.write_table(pa.table({"text": rows}), out["parquet"] / f"{name}.parquet")
        shard, rows, size = shard + 1, [], 0

    for d in documents(mb):
        rows.append(d)
        size += len(d)
        if size >= 64 << 20:
            flush()
    flush()
    return out


def tokenizers_throughput(tokenizer, mb: float) -> float:
    """MB/s of `tokenizers`' batch encoding of in-memory documents, in 8 MB batches (the best of two)."""
    docs = list(documents(mb, seed=1))
    batches, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= 8 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for b in batches:
            tokenizer._tok.encode_batch(b, add_special_tokens=False)
        best = min(best, time.perf_counter() - t)
    return sum(map(len, docs)) / 2**20 / best


def timed(cmd: list[str]) -> dict:
    """Wall time and the command's own peak RSS (GNU time's %M when /usr/bin/time is there, else the largest
    child of this process so far)."""
    gnu = Path("/usr/bin/time").exists()
    t = time.perf_counter()
    done = subprocess.run((["/usr/bin/time", "-f", "RSS_KB %M"] if gnu else []) + cmd, capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    kb = [int(ln.split()[1]) for ln in done.stderr.splitlines() if ln.startswith("RSS_KB ")]
    rss = kb[-1] / 2**20 if kb else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"wall_s": wall, "rss_gb": rss}


def time_to_step(cmd: list[str], metrics: Path, step: int) -> dict:
    """Wall time from starting `cmd` (a `jaxlm train` of many steps) until `metrics` logs step `step`'s loss,
    and its peak RSS then (/proc's VmHWM); then SIGTERM (it checkpoints and exits, without the closing
    evaluation)."""
    import signal

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = rss = None
    while proc.poll() is None and wall is None:
        if metrics.is_file() and any(
            json.loads(ln).get("step") == step and "loss" in ln for ln in metrics.read_text().splitlines()
        ):
            wall = time.perf_counter() - t
            status = Path(f"/proc/{proc.pid}/status")
            hwm = [ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM")] if status.exists() else []
            rss = int(hwm[0].split()[1]) / 2**20 if hwm else None
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if wall is None:
        raise SystemExit(f"{' '.join(cmd)} ended before step {step}:\n{err[-3000:]}")
    return {"wall_s": wall, "rss_gb": rss}


def synthetic_prepared(like: Path, out: Path, gb: float) -> Path:
    """A prepared directory holding `gb` GB of text's worth of random ids (at `like`'s bytes per token), with
    `like`'s tokenizer and validation split: what memory a start needs at that size, without tokenizing it."""
    import shutil

    index = json.loads((like / "index.json").read_text())
    train = index["splits"]["train"]
    n = int(gb * 2**30 * train["tokens"] / train["bytes"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in ("tokenizer.json", "val.tokens", "val.ends"):
        shutil.copy(like / f, out / f)
    rng = np.random.default_rng(0)
    with open(out / "train.tokens", "wb") as f:
        for start in range(0, n, 1 << 26):
            f.write(rng.integers(0, index["vocab_size"], min(1 << 26, n - start), dtype=np.uint16).tobytes())
    np.asarray([n], np.int64).tofile(out / "train.ends")
    index["splits"]["train"] = {"tokens": n, "documents": 1, "bytes": int(gb * 2**30)}
    (out / "index.json").write_text(json.dumps(index))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=1024)
    p.add_argument("--formats", nargs="+", default=["text", "jsonl", "jsonl.zst", "parquet"])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--flat-gb", type=float, default=10, help="also start training on this many GB (0: skip)")
    p.add_argument("--reuse", action="store_true", help="keep the corpus and prepares of an earlier run at --root")
    p.add_argument("--root", default="runs/gallery/bench_data")
    p.add_argument("--out", default=str(RESULTS / "bench_data"))
    args = p.parse_args(argv)
    started = time.perf_counter()
    root = (ROOT / args.root).resolve()
    if args.reuse and (root / "corpus").is_dir():
        corpus = {f: root / "corpus" / f for f in args.formats}
        print(f"corpus: {root / 'corpus'} (kept)")
    else:
        corpus = write_corpus(root / "corpus", args.mb, args.formats)
        print(f"corpus: {args.mb:.0f} MB in {args.formats} ({time.perf_counter() - started:.0f} s to write)")

    from jaxlm.data.loader import PackedLoader
    from jaxlm.data.prepare import TextSource, open_prepared, train_tokenizer

    if args.reuse and (root / "tokenizer.json").is_file():
        from jaxlm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(root / "tokenizer.json")
    else:
        tokenizer = train_tokenizer(TextSource(str(corpus[args.formats[0]])), "bpe", args.vocab, sample_mb=16)
        tokenizer.save(root / "tokenizer.json")
    reference = tokenizers_throughput(tokenizer, min(args.mb, 128))
    print(f"tokenizers' batch encoding: {reference:.2f} MB/s on {os.cpu_count()} cores")
    rows = []
    for fmt in args.formats:
        out = root / f"prepared-{fmt}"
        kept = root / f"prepared-{fmt}.row.json"
        if args.reuse and kept.is_file() and (out / "index.json").is_file():  # measured by an earlier run
            rows.append(json.loads(kept.read_text()))
            print(f"{fmt:>10}: {rows[-1]['prepare_mb_s']:.2f} MB/s (kept from {rows[-1]['commit']})")
            continue
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "jaxlm", "data", "prepare", str(corpus[fmt]), "--out", str(out),
               "--tokenizer", str(root / "tokenizer.json"), "--val-fraction", "0.002", "--no-progress"]  # fmt: skip
        run = timed(cmd)
        index = open_prepared(out).index
        text_mb = (index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"]) / 2**20
        rows.append({"format": fmt, "prepare_s": run["wall_s"], "prepare_mb_s": text_mb / run["wall_s"],
                     "of_tokenizers": text_mb / run["wall_s"] / reference, "peak_rss_gb": run["rss_gb"],
                     "train_tokens": index["splits"]["train"]["tokens"]})  # fmt: skip
        r = rows[-1]
        r["commit"] = commit()
        kept.write_text(json.dumps(r))
        print(f"{fmt:>10}: {r['prepare_mb_s']:.2f} MB/s ({r['of_tokenizers']:.0%} of tokenizers'), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")  # fmt: skip
    prepared = root / f"prepared-{args.formats[-1]}"
    run_dir = root / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    train = [sys.executable, "-m", "jaxlm", "train", "configs/llama_tiny.yaml", f"data.source={prepared}",
             f"train.run_dir={run_dir}", *TRAIN, "--no-progress"]  # fmt: skip
    metrics_file = run_dir / "metrics.jsonl"
    first = time_to_step([*train, "train.steps=100000"], metrics_file, 1)
    resumed = time_to_step([*train, "train.steps=100000"], metrics_file, 2)
    time_to_step([*train, "train.steps=100000", "train.ckpt_every=0"], metrics_file, 12)  # training's own speed
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    consumed = float(np.median([m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][-5:]))
    tokens = open_prepared(prepared).tokens("train")
    loader = PackedLoader(tokens, seq_len=128, batch_size=16, seed=0)
    t, served = time.perf_counter(), 0
    while time.perf_counter() - t < 3:
        served += loader.batch(served // (16 * 128) + 1)["inputs"].size
    loader_tok_s = served / (time.perf_counter() - t)
    flat = None
    if args.flat_gb:  # memory flat in corpus size: the same start on a prepared directory of --flat-gb GB of text
        big = synthetic_prepared(prepared, root / "prepared-synthetic", args.flat_gb)
        big_dir = root / "run-synthetic"
        if big_dir.exists():
            import shutil

            shutil.rmtree(big_dir)
        big_train = [a.replace(str(prepared), str(big)).replace(str(run_dir), str(big_dir)) for a in train]
        flat = time_to_step([*big_train, "train.steps=100000"], big_dir / "metrics.jsonl", 1)
        print(f"synthetic {args.flat_gb} GB of text: first step after {flat['wall_s']:.1f} s, peak RSS "
              f"{flat['rss_gb']:.2f} GB")  # fmt: skip
    result = {
        "corpus_mb": args.mb,
        "cores": os.cpu_count(),
        "tokenizers_mb_s": reference,
        "prepare": rows,
        "first_step_s": first["wall_s"],
        "first_step_peak_rss_gb": first["rss_gb"],
        "resume_step_s": resumed["wall_s"],
        "resume_peak_rss_gb": resumed["rss_gb"],
        "flat_gb": args.flat_gb,
        "flat_first_step_s": flat and flat["wall_s"],
        "flat_peak_rss_gb": flat and flat["rss_gb"],
        "training_tok_s": consumed,
        "loader_tok_s": loader_tok_s,
        "loader_over_training": loader_tok_s / consumed if consumed else None,
    }
    print(f"train: first step after {first['wall_s']:.1f} s (peak RSS {first['rss_gb']:.2f} GB), resumed step after "
          f"{resumed['wall_s']:.1f} s; loader {loader_tok_s:,.0f} tok/s vs training {consumed:,.0f} tok/s")  # fmt: skip
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar([r["format"] for r in rows], [r["prepare_mb_s"] for r in rows], color="C0", label="jaxlm data prepare")
    a.axhline(reference, color="C1", ls="--", label="tokenizers' batch encoding")
    a.set_ylabel("MB of text / s")
    a.set_title(f"prepare, {args.mb:.0f} MB, {os.cpu_count()} cores", fontsize=9)
    a.legend(fontsize=7)
    b.bar(["first step", "resumed step"], [first["wall_s"], resumed["wall_s"]], color=["C2", "C3"])
    b.set_ylabel("s from `jaxlm train`")
    b.set_title("start on the prepared corpus", fontsize=9)
    fig.tight_layout()
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
