"""experiments/norms_mlp.py --quick: norm placement, warmup, LayerNorm/RMSNorm, GELU/SwiGLU at equal size."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_compares_norms_and_mlps(quick):
    result = quick("norms_mlp")
    rows = {r["variant"]: r for r in result["rows"]}
    assert {"pre-norm", "post-norm", "post-norm, no warmup", "LayerNorm", "GELU MLP"} <= set(rows)
    assert rows["pre-norm, no warmup"]["warmup"] == 0 and rows["pre-norm"]["warmup"] > 0
    # equal parameters: GELU's two matrices of 1.5x width against SwiGLU's three
    assert rows["GELU MLP"]["parameters"] == rows["pre-norm"]["parameters"]
    assert rows["LayerNorm"]["parameters"] > rows["pre-norm"]["parameters"]  # its biases
    for r in rows.values():
        assert len(r["train_curve"]) == result["steps"] and r["val_loss"] > 0 and r["final_train_loss"] > 0
    assert set(result["norm_op_seconds"]) == {"layernorm", "rmsnorm"}
