"""Prepare once: the token files equal today's in-memory tokens, resume after an interruption, and train."""

import json

import numpy as np
import pytest

from jaxlm.data import prepare as prep
from jaxlm.data import sources
from jaxlm.data.corpus import load_corpus
from jaxlm.data.loader import PackedLoader, pack_documents
from jaxlm.data.prepare import TextSource, open_prepared, prepare, sample_texts, train_tokenizer
from jaxlm.data.tokenizer import BPETokenizer, ByteTokenizer
from jaxlm.errors import ConfigError, DataError


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A directory of texts, one larger than a piece (so it streams in pieces), in several languages."""
    monkeypatch.setattr(sources, "TEXT_PIECE", 512)
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(6):
        words = " ".join(f"word{j % 37} 你好{j % 5} café" for j in range(40 + 30 * i))
        (d / f"{i}.txt").write_text(f"Title {i}\n\n{words}\n  indented line\n" * (8 if i == 2 else 1))
    return str(d)


def in_memory(source, tokenizer, val_fraction=0.05):
    train, val = load_corpus(source, val_fraction)
    return (pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id) for docs in (train, val))


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_prepared_tokens_and_batches_equal_the_in_memory_path(corpus, tmp_path, kind):
    text = TextSource(corpus, val_fraction=0.2)
    tokenizer = train_tokenizer(text, kind, 400)
    if kind == "bpe":  # the whole split fits the sample: the same BPE as training on all of it
        train, _ = load_corpus(corpus, 0.2)
        assert tokenizer._tok.get_vocab() == BPETokenizer.train(train, 400)._tok.get_vocab()
    p = prepare(text, tmp_path / "out", tokenizer, chunk_bytes=700)
    want_train, want_val = in_memory(corpus, tokenizer, 0.2)
    train, val = p.tokens("train"), p.tokens("val")
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(val, want_val)
    ends = p.ends("train")
    assert ends[-1] == len(train) and np.all(train[ends - 1] == tokenizer.eos_id)
    a = PackedLoader(train, seq_len=16, batch_size=4, seed=3)
    b = PackedLoader(want_train, seq_len=16, batch_size=4, seed=3)
    for k in range(6):
        for key, value in a.batch(k).items():
            assert value.dtype == np.int32
            np.testing.assert_array_equal(value, b.batch(k)[key])
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["splits"]["train"]["tokens"] == len(train) and index["eos_id"] == tokenizer.eos_id
    assert not (tmp_path / "out.partial").exists()


def test_an_interrupted_prepare_resumes_to_the_same_files(corpus, tmp_path, monkeypatch):
    text = TextSource(corpus, val_fraction=0.2)
    tokenizer = ByteTokenizer()
    whole = prepare(text, tmp_path / "whole", tokenizer, chunk_bytes=300)
    calls, encode = [0], prep._encode

    def dies_on_the_fifth_chunk(*a):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return encode(*a)

    monkeypatch.setattr(prep, "_encode", dies_on_the_fifth_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(text, tmp_path / "cut", tokenizer, chunk_bytes=300)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "progress.json").is_file()
    with open(tmp_path / "cut.partial" / "train.tokens", "ab") as f:  # bytes written after the last commit
        f.write(b"\x01\x02\x03")
    monkeypatch.setattr(prep, "_encode", encode)
    resumed = prepare(text, tmp_path / "cut", tokenizer, chunk_bytes=300)
    for split in ("train", "val"):
        for what in ("tokens", "ends"):
            a = (whole.path / f"{split}.{what}").read_bytes()
            assert a == (resumed.path / f"{split}.{what}").read_bytes(), (split, what)


def test_prepared_directories_refuse_what_they_do_not_hold(corpus, tmp_path):
    text = TextSource(corpus, val_fraction=0.2)
    p = prepare(text, tmp_path / "out", ByteTokenizer())
    assert prepare(text, tmp_path / "out", ByteTokenizer()).index == p.index  # already there: reused
    with pytest.raises(DataError, match="another source or tokenizer"):
        prepare(text, tmp_path / "out", train_tokenizer(text, "bpe", 300))
    with open(p.path / "train.tokens", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="damaged"):
        open_prepared(p.path).tokens("train")
    (p.path / "index.json").write_text("{")
    with pytest.raises(DataError, match="index.json is unreadable"):
        open_prepared(p.path)
    with pytest.raises(DataError, match="not a prepared data directory"):
        open_prepared(tmp_path)


def test_the_tokenizer_sample_is_bounded_and_deterministic(corpus):
    text = TextSource(corpus, val_fraction=0.2)
    everything = list(sample_texts(text, 100))
    assert "".join(everything) == "".join(load_corpus(corpus, 0.2)[0])
    small = list(sample_texts(text, 2000 / 2**20))
    assert small == list(sample_texts(text, 2000 / 2**20))
    assert 0 < sum(map(len, small)) < 2000 + 512 and len(small) < len(everything)


def test_two_processes_read_disjoint_rows_of_the_global_batch(corpus, tmp_path):
    p = prepare(TextSource(corpus, val_fraction=0.2), tmp_path / "out", ByteTokenizer())
    tokens = p.tokens("train")
    whole = PackedLoader(tokens, seq_len=8, batch_size=6, seed=1)
    halves = [PackedLoader(tokens, seq_len=8, batch_size=6, seed=1, process_index=i, process_count=2) for i in (0, 1)]
    for k in range(4):
        got = np.concatenate([h.batch(k)["inputs"] for h in halves])
        np.testing.assert_array_equal(got, whole.batch(k)["inputs"])


def test_training_reads_a_prepared_directory_and_resumes(tiny_config, corpus_file, tmp_path):
    from jaxlm.cli import main
    from jaxlm.train.trainer import train

    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(corpus_file), "--out", str(out), "--vocab-size", "300", "--no-progress"]) == 0
    cfg = tiny_config("llama_tiny", f"data.source={out}", "train.steps=3")
    first = train(cfg)
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    cfg = tiny_config("llama_tiny", f"data.source={out}", "train.steps=5")
    assert train(cfg)["step"] == 5 and first["step"] == 3
    from jaxlm.train.data import prepared_text

    with pytest.raises(ConfigError, match="prepared with another tokenizer"):  # e.g. a base's tokenizer
        prepared_text(cfg, ByteTokenizer())


def test_raw_sources_are_prepared_once_into_the_cache(tiny_config, tmp_path):
    from jaxlm.train.trainer import train

    src = tmp_path / "c.jsonl.gz"
    import gzip

    docs = [{"text": f"record {i} " + "lorem ipsum dolor " * (i % 9 + 3)} for i in range(400)]
    src.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs).encode()))
    cache = tmp_path / "cache"
    cfg = tiny_config("llama_tiny", f"data.source={src}", f"data.cache_dir={cache}", "train.steps=2")
    train(cfg)
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert [e.split("-")[0] for e in entries] == ["tokens"]  # byte tokenizer (tiny_config): nothing to train
    stamp = (cache / entries[0] / "index.json").stat().st_mtime_ns
    train(tiny_config("llama_tiny", f"data.source={src}", f"data.cache_dir={cache}", "train.steps=3"))
    assert (cache / entries[0] / "index.json").stat().st_mtime_ns == stamp  # read, not prepared again
