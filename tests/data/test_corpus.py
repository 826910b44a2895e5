import pytest

from jaxlm.data.corpus import VAL_WORKS, embedded_works, load_corpus
from jaxlm.data.tokenizer import DataError


def test_embedded_corpus_splits_by_work():
    works = embedded_works()
    assert len(works) == 42 and "hamlet.txt" in works
    train, val = load_corpus("shakespeare")
    assert len(train) == 40 and val == [works[n] for n in VAL_WORKS]
    assert 0.03 < sum(map(len, val)) / sum(map(len, works.values())) < 0.08


def test_single_file_holds_out_its_tail(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("".join(f"line {i}\n" for i in range(1000)))
    train, val = load_corpus(str(p), 0.1)
    assert train[0] + val[0] == p.read_text() and val[0].startswith("line 9")


def test_directory_and_glob_hold_out_whole_files(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"text {i}\n" * 50)
    train, val = load_corpus(str(tmp_path), 0.15)
    assert len(train) == 8 and val == ["text 8\n" * 50, "text 9\n" * 50]
    train, val = load_corpus(str(tmp_path / "[0-4].txt"), 0.2)
    assert len(train) + len(val) == 5


def test_invalid_utf8_file_is_read_with_replacement(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\n" * 20 + b"bad \xff\xfe bytes\n")
    train, val = load_corpus(str(p), 0.3)
    assert "\ufffd" in train[0] + val[0]


def test_missing_or_empty_sources(tmp_path):
    with pytest.raises(DataError, match="neither the embedded corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(str(tmp_path / "e.txt"))
