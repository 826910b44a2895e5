"""experiments/positions.py --quick: five position encodings trained at one length, scored at four."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_scores_every_encoding_at_every_length(quick):
    result = quick("positions")
    context = result["context"]
    lengths = [str(n) for n in result["lengths"]]  # JSON keys
    assert result["lengths"] == [context, 2 * context, 4 * context, 8 * context]
    rows = {r["position"]: r for r in result["rows"]}
    assert list(rows) == ["learned", "sinusoidal", "rope", "alibi", "relative"]
    for r in rows.values():
        assert sorted(r["perplexity"], key=int) == lengths and all(1 < p < 1000 for p in r["perplexity"].values())
    assert set(result["rope_scaled"]) == {"linear", "dynamic", "yarn"}
    for scaling, ppl in result["rope_scaled"].items():
        # at the training length every scaling leaves RoPE as it was (factor 1, or within the original length)
        assert ppl[lengths[0]] == pytest.approx(rows["rope"]["perplexity"][lengths[0]], rel=1e-3), scaling
    # linear interpolation changes the rotation at a longer length: a different model there
    assert result["rope_scaled"]["linear"][lengths[-1]] != rows["rope"]["perplexity"][lengths[-1]]
