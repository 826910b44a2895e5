import numpy as np
import pytest

from jaxlm.data.loader import PackedLoader, eval_batches, pack_documents
from jaxlm.data.tokenizer import DataError

tokens = np.arange(1000, dtype=np.int32)


def test_pack_documents_separates_with_eos():
    np.testing.assert_array_equal(pack_documents([[1, 2], [3]], 0), [1, 2, 0, 3, 0])


def test_targets_are_inputs_shifted():
    b = next(PackedLoader(tokens, seq_len=16, batch_size=4))
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["targets"][:, -1], b["inputs"][:, -1] + 1)


def test_order_is_deterministic_and_resumable():
    a = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3)
    first = [next(a)["inputs"] for _ in range(30)]  # crosses epochs (14 batches each)
    b = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3)
    for _ in range(11):
        next(b)
    c = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3)
    c.restore(b.state())
    for k in range(11, 30):
        np.testing.assert_array_equal(next(c)["inputs"], first[k])
    other = PackedLoader(tokens, seq_len=16, batch_size=4, seed=4)
    assert not np.array_equal(next(other)["inputs"], first[0])


def test_epoch_covers_distinct_windows():
    a = PackedLoader(tokens, seq_len=16, batch_size=4)
    starts = [row[0] for _ in range(a.batches_per_epoch) for row in next(a)["inputs"]]
    assert len(set(starts)) == len(starts)


def test_processes_split_each_global_batch():
    full = PackedLoader(tokens, seq_len=8, batch_size=4).batch(5)["inputs"]
    parts = [
        PackedLoader(tokens, seq_len=8, batch_size=4, process_index=i, process_count=2).batch(5)["inputs"]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_restore_rejects_other_data():
    a = PackedLoader(tokens, seq_len=16, batch_size=4)
    state = a.state()
    with pytest.raises(DataError, match="corpus, tokenizer or data.seed changed"):
        PackedLoader(tokens[:900], seq_len=16, batch_size=4).restore(state)


def test_too_little_data():
    with pytest.raises(DataError, match="too few for one batch"):
        PackedLoader(tokens[:50], seq_len=16, batch_size=4)


def test_eval_batches_score_every_token_once():
    seen = []
    for b in eval_batches(tokens[:203], seq_len=16, batch_size=4):
        seen.extend(b["targets"][b["mask"]].tolist())
    assert seen == list(range(1, 203))
    assert len(list(eval_batches(tokens, seq_len=16, batch_size=4, max_batches=2))) == 2


def test_document_segments_restart_after_each_end_of_text():
    from jaxlm.data.loader import document_segments

    out = document_segments(np.array([[5, 6, 0, 7, 8, 9, 0, 1], [0, 3, 3, 3, 3, 3, 3, 3]]), 0)
    np.testing.assert_array_equal(out["segments"], [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]])
