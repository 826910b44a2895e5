"""experiments/tokenization.py --quick: bytes and BPE vocabularies on the same token budget."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_compares_tokenizers_in_bits_per_byte(quick):
    result = quick("tokenization")
    rows = result["rows"]
    assert rows[0]["tokenizer"] == "byte" and rows[0]["tokens_per_byte"] == pytest.approx(1.0, abs=0.01)
    per_byte = [r["tokens_per_byte"] for r in rows]
    assert per_byte == sorted(per_byte, reverse=True)  # a larger BPE vocabulary packs more bytes per token
    assert [r["vocab_size"] for r in rows] == sorted(r["vocab_size"] for r in rows)
    assert len({r["non_embedding_parameters"] for r in rows}) == 1  # only the vocabulary tables differ
    assert all(r["val_bpb"] > 0 and r["bytes_per_s"] > r["tokens_per_s"] * 0.99 for r in rows)
