"""experiments/long_context.py --quick: memory against T, the longest T in a budget, context parallelism and a
YaRN context extension, on a tiny model."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_measures_memory_context_parallelism_and_extension(quick):
    result = quick("long_context")
    rows = {(r["variant"], r["T"]): r for r in result["rows"]}
    longest_T = max(T for _, T in rows)
    reference, fast = rows[("reference", longest_T)], rows[("blockwise + chunked loss", longest_T)]
    assert fast["peak_bytes"] * 2 < reference["peak_bytes"]  # the (T, T) scores and (T, V) logits are gone
    fits = result["longest"]
    assert fits["blockwise + chunked loss"] > fits["reference"]
    cp = result["context_parallel"]
    assert cp["context=4"]["peak_bytes"] < cp["context=1"]["peak_bytes"]
    assert cp["context=4"]["loss"] == pytest.approx(cp["context=1"]["loss"], rel=1e-5)
    yarn = result["yarn"]
    assert yarn["long"] == 16 * yarn["short"] and all(v > 1 for v in yarn["after"].values())
