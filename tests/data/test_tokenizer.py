import numpy as np
import pytest

from jaxlm.data.tokenizer import BPETokenizer, ByteTokenizer, DataError, load_tokenizer

TEXTS = ["Hello, world!\n", "ROMEO.\n  But soft, what light", "你好，世界", "emoji 🎉👍🏽 café", "", "\t\r\n  "]


@pytest.fixture(scope="module")
def bpe(corpus_file):
    return BPETokenizer.train([corpus_file.read_text(encoding="utf-8")], 400)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_round_trip_any_utf8(kind, bpe):
    tok = bpe if kind == "bpe" else ByteTokenizer()
    for t in TEXTS:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert int(tok.token_bytes[ids].sum()) == len(t.encode("utf-8"))


def test_bpe_compresses_and_has_eos(bpe):
    text = "Shall I compare thee to a summer's day?"
    assert len(bpe.encode(text)) < len(text.encode()) / 1.5
    assert bpe.token_bytes[bpe.eos_id] == 0 and bpe.decode([bpe.eos_id]) == ""


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_invalid_utf8_never_crashes(kind, bpe):
    tok = bpe if kind == "bpe" else ByteTokenizer()
    data = b"ok \xff\xfe\xc3 end"
    ids = tok.encode(data)
    assert tok.decode(ids).startswith("ok ")
    # Decoding a token sequence cut inside a multi-byte character never raises either.
    cut = tok.encode("世")[:1] if kind == "byte" else ByteTokenizer().encode("世")[:1]
    assert "\ufffd" in ByteTokenizer().decode(cut)
    assert isinstance(tok.decode(tok.encode("世界")[:1]), str)


def test_byte_tokenizer_is_exact_on_invalid_bytes():
    data = b"ok \xff\xfe\xc3 end"
    assert ByteTokenizer().decode_bytes(ByteTokenizer().encode(data)) == data
    # Command-line text with invalid bytes arrives as surrogate escapes.
    escaped = data.decode("utf-8", errors="surrogateescape")
    assert ByteTokenizer().decode_bytes(ByteTokenizer().encode(escaped)) == data


def test_bpe_accepts_surrogate_escaped_text(bpe):
    escaped = b"ok \xff end".decode("utf-8", errors="surrogateescape")
    assert bpe.decode(bpe.encode(escaped)) == "ok \ufffd end"


def test_save_and_load(bpe, tmp_path):
    bpe.save(tmp_path / "bpe.json")
    ByteTokenizer().save(tmp_path / "byte.json")
    again = load_tokenizer(tmp_path / "bpe.json")
    assert again.encode("to be or not") == bpe.encode("to be or not")
    np.testing.assert_array_equal(again.token_bytes, bpe.token_bytes)
    assert isinstance(load_tokenizer(tmp_path / "byte.json"), ByteTokenizer)


def test_missing_or_corrupt_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is corrupt"):
        load_tokenizer(bad)
    bad.write_text('{"model": 3}')
    with pytest.raises(DataError, match="cannot read tokenizer file"):
        load_tokenizer(bad)
