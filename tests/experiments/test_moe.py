"""experiments/moe.py --quick: dense against mixtures of experts, and the three ways of balancing."""

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_compares_dense_and_experts(quick):
    result = quick("moe")
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {
        "dense",
        "MoE, equal active",
        "dense, equal total",
        "MoE, loss-free balancing",
        "MoE, no balancing",
    }
    dense, moe, total = rows["dense"], rows["MoE, equal active"], rows["dense, equal total"]
    # a token's MLP as wide as the dense one's (and the router)
    assert moe["active_parameters"] == dense["parameters"] + moe["router_parameters"]
    # equal total: the dense 4x-wide MLP holds the experts' parameters (the MoE adds its router)
    assert moe["parameters"] == total["parameters"] + moe["router_parameters"] > 0
    for r in rows.values():
        assert r["val_loss"] > 0 and len(r["train_curve"]) == result["steps"]
        assert (r["expert_loads"] is None) == r["variant"].startswith("dense")
        if r["expert_loads"]:
            assert abs(sum(r["expert_loads"]) - 1) < 1e-3 and r["imbalance_curve"]
