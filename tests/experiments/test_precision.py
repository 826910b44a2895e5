"""experiments/precision.py --quick: fp32, bf16 and fp16 with loss scaling, trained alike."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_trains_in_three_precisions(quick):
    result = quick("precision")
    rows = {r["precision"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "bf16", "fp16"]
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["fp16"]["loss_scale_curve"] and rows["fp16"]["skipped_steps"] >= 0
    assert "loss_scale_curve" not in rows["fp32"]
    # a few steps from the same start: the precisions agree to well within a tenth of a nat
    assert abs(rows["bf16"]["val_loss"] - rows["fp32"]["val_loss"]) < 0.1
