"""Documents from every format a corpus comes in, streamed; bad records reported by file and line."""

import gzip
import json

import numpy as np
import pytest

from jaxlm.data import sources
from jaxlm.data.corpus import load_corpus
from jaxlm.data.sources import BadRecords, Part, pieces, source_files
from jaxlm.errors import DataError

DOCS = [f"document {i}: {'héllo wörld 你好 🎉 ' * (i % 7 + 1)}\nsecond line {i}" for i in range(60)]


def _jsonl(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def write_formats(tmp_path, docs=DOCS) -> dict[str, str]:
    """The same records as JSONL, .jsonl.gz, .jsonl.zst, Parquet, Arrow and a `datasets` save_to_disk directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    raw = _jsonl(docs)
    out = {"jsonl": tmp_path / "c.jsonl", "gz": tmp_path / "c.jsonl.gz", "zst": tmp_path / "c.jsonl.zst"}
    out["jsonl"].write_bytes(raw)
    out["gz"].write_bytes(gzip.compress(raw))
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    out["parquet"] = tmp_path / "c.parquet"
    pq.write_table(table, out["parquet"], row_group_size=7)
    out["arrow"] = tmp_path / "c.arrow"
    with pa.OSFile(str(out["arrow"]), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=11)
    datasets = pytest.importorskip("datasets")
    out["hf"] = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(out["hf"]))
    return {k: str(v) for k, v in out.items()}


def test_every_format_gives_the_same_documents_and_split(tmp_path):
    paths = write_formats(tmp_path)
    for kind, path in paths.items():
        train, val = load_corpus(path, 0.1)
        assert train + val == DOCS, kind
        assert len(val) == 6, kind  # the last 10% of the records


def test_a_text_file_streams_in_line_aligned_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_PIECE", 100)
    text = "".join(f"line {i} with words\nmore {i}\n  indented {i}\n\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    (part,) = source_files(str(tmp_path / "a.txt"))
    got = list(pieces(part))
    assert "".join(t for t, _ in got) == text and len(got) > 20
    assert [end for _, end in got] == [False] * (len(got) - 1) + [True]
    for (t, _), (u, _) in zip(got, got[1:]):  # each cut: after a line break between two non-spaces
        assert t.endswith("\n") and not t[-2].isspace() and not u[0].isspace()
    train, val = load_corpus(str(tmp_path / "a.txt"), 0.1)
    assert train[0] + val[0] == text  # whole documents again


def test_malformed_lines_are_skipped_up_to_the_limit(tmp_path, caplog):
    p = tmp_path / "c.jsonl"
    p.write_bytes(_jsonl(DOCS[:5]) + b"{not json\n" + b'{"text": "bad \xff utf8"}\n' + _jsonl(DOCS[5:10]))
    (part,) = source_files(str(p))
    bad = BadRecords(2)
    texts = [t for t, _ in pieces(part, "text", bad)]
    assert [t for t in texts if t] == DOCS[:10] and bad.count == 2
    assert f"{p}:6: not valid JSON" in caplog.text and f"{p}:7: not valid UTF-8" in caplog.text
    with pytest.raises(DataError, match=rf"{p}:7: .*more than data.max_bad_records=1"):
        list(pieces(part, "text", BadRecords(1)))


def test_missing_fields_columns_and_broken_files_are_clear_errors(tmp_path):
    paths = write_formats(tmp_path)
    for kind in ("jsonl", "gz", "zst", "parquet", "arrow", "hf"):
        with pytest.raises(DataError, match="'body'"):
            load_corpus(paths[kind], 0.1, text_field="body")
    p = tmp_path / "nums.jsonl"
    p.write_text('{"text": 3}\n' * 3)
    with pytest.raises(DataError, match=rf"{p}:1: 'text' is int"):
        load_corpus(str(p), 0.34)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(_jsonl(DOCS))[:300])
    with pytest.raises(DataError, match=rf"{cut}: cannot decompress"):
        load_corpus(str(cut), 0.1)
    import zstandard

    for frames in (1, 3):  # truncated inside a frame, or after whole frames of several
        data = b"".join(zstandard.ZstdCompressor().compress(_jsonl(DOCS)) for _ in range(frames))
        cut = tmp_path / f"cut{frames}.jsonl.zst"
        cut.write_bytes(data[: len(data) - 100])
        with pytest.raises(DataError, match=rf"{cut}: cannot decompress"):
            load_corpus(str(cut), 0.1)
    whole = tmp_path / "three.jsonl.zst"
    whole.write_bytes(data)
    train, val = load_corpus(str(whole), 0.1)
    assert train + val == DOCS * 3
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{junk}: not a readable Parquet file"):
        load_corpus(str(junk), 0.1)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match="too few to hold out validation"):
        load_corpus(str(one), 0.1)


def test_a_datasets_directory_is_read_as_its_arrow_files(tmp_path):
    paths = write_formats(tmp_path)
    parts = source_files(paths["hf"])
    assert parts and all(isinstance(p, Part) and p.kind == "arrow" for p in parts)


def test_source_fingerprint_follows_content(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("abc\n" * 10)
    a = sources.fingerprint(source_files(str(p)))
    assert sources.fingerprint(source_files(str(p))) == a
    p.write_text("abd\n" * 10)
    assert sources.fingerprint(source_files(str(p))) != a
    np.testing.assert_equal(len(a), 64)
