import numpy as np
import pytest

from jaxlm.data.seq2seq import Seq2SeqLoader, random_spans_mask, read_pairs, span_corrupt
from jaxlm.data.tokenizer import DataError


@pytest.mark.parametrize("length,rate,mean", [(128, 0.15, 3.0), (32, 0.15, 3.0), (64, 0.5, 2.0)])
def test_span_mask_has_the_noise_and_span_counts(length, rate, mean):
    mask = random_spans_mask(np.random.default_rng(0), length, rate, mean)
    noise = round(length * rate)
    assert mask.sum() == noise
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == max(round(noise / mean), 1)
    assert not mask[0]  # T5 starts with kept tokens


def test_span_corruption_round_trips():
    tokens = np.arange(10, 42)
    mask = random_spans_mask(np.random.default_rng(1), 32, 0.3, 2.0)
    sentinels = [99, 98, 97, 96, 95, 94]
    src, tgt = span_corrupt(tokens, mask, sentinels, eos_id=1)
    assert tgt[-1] == 1
    # Put each sentinel's tokens back into the source: the original window.
    spans, current = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    rebuilt = [x for t in src for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == tokens.tolist()


def test_pairs_file_errors(tmp_path):
    p = tmp_path / "pairs.tsv"
    with pytest.raises(DataError, match="pairs file not found"):
        read_pairs(p)
    p.write_text("hello\tbonjour\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.tsv:2: expected 'source<TAB>target'"):
        read_pairs(p)
    p.write_bytes(b"caf\xe9\tcoffee\n\xe4\xbd\xa0\xe5\xa5\xbd\thello\n")  # invalid UTF-8, then Chinese
    assert read_pairs(p) == [("caf\ufffd", "coffee"), ("你好", "hello")]


def test_loader_batches_are_pure_functions_of_the_step():
    tokens = np.arange(2000) % 250
    kw = dict(seq_len=32, target_len=12, batch_size=4, start_id=256, eos_id=256, sentinels=list(range(299, 260, -1)))
    a, b = Seq2SeqLoader(tokens=tokens, **kw), Seq2SeqLoader(tokens=tokens, **kw)
    first = [next(a) for _ in range(3)]
    b.restore(a.state())
    b.position = 1
    np.testing.assert_array_equal(next(b)["src"], first[1]["src"])
    batch = first[0]
    assert batch["src"].shape == (4, 32) and batch["tgt_out"].shape == (4, 12)
    np.testing.assert_array_equal(
        batch["tgt_in"][:, 1:][batch["tgt_mask"][:, 1:]], batch["tgt_out"][:, :-1][batch["tgt_mask"][:, 1:]]
    )
    assert (batch["tgt_in"][:, 0] == 256).all()
