"""experiments/scaling.py --quick: models of two sizes on the same tokens, a power law fitted."""

import math

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_fits_loss_against_parameters(quick):
    result = quick("scaling")
    rows = result["rows"]
    sizes = [r["non_embedding_parameters"] for r in rows]
    assert len(rows) == 2 and sizes[0] < sizes[1]
    assert len({r["train_tokens"] for r in rows}) == 1  # fixed data
    fit = result["fit"]
    assert math.isfinite(fit["alpha"]) and fit["a"] > 0
    for r in rows:  # the fit passes between the points it was fitted to
        assert fit["a"] * r["non_embedding_parameters"] ** -fit["alpha"] == pytest.approx(r["val_loss"], rel=0.05)
