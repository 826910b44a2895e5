"""experiments/attention_heads.py --quick: three tiny trainings, their figures in JSON and PNG."""


def test_quick_run_compares_mha_gqa_mqa(quick):
    result = quick("attention_heads")
    rows = {r["variant"]: r for r in result["rows"]}
    assert [rows[v]["kv_heads"] for v in ("MHA", "GQA", "MQA")] == [8, 2, 1]
    assert rows["MHA"]["kv_cache_bytes_per_token"] == 8 * rows["MQA"]["kv_cache_bytes_per_token"]
    sizes = [r["parameters"] for r in rows.values()]
    assert max(sizes) / min(sizes) < 1.05  # matched parameter counts
    assert all(r["val_loss"] > 0 and r["decode_tokens_per_s_batch16"] > 0 for r in rows.values())
