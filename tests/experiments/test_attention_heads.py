"""experiments/attention_heads.py --quick: three tiny trainings, their figures in JSON and PNG."""

import json
import subprocess
import sys


def test_quick_run_compares_mha_gqa_mqa(tmp_path):
    out = tmp_path / "attention_heads"
    cmd = [sys.executable, "experiments/attention_heads.py", "--quick", "--root", str(tmp_path / "runs")]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"rows", "summary", "steps", "command", "commit", "wall_s"} <= set(result)
    rows = {r["variant"]: r for r in result["rows"]}
    assert [rows[v]["kv_heads"] for v in ("MHA", "GQA", "MQA")] == [8, 2, 1]
    assert rows["MHA"]["kv_cache_bytes_per_token"] == 8 * rows["MQA"]["kv_cache_bytes_per_token"]
    sizes = [r["parameters"] for r in rows.values()]
    assert max(sizes) / min(sizes) < 1.05  # matched parameter counts
    assert all(r["val_loss"] > 0 and r["decode_tokens_per_s_batch16"] > 0 for r in rows.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
