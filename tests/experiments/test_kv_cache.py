"""experiments/kv_cache.py in --quick mode: runs, and writes its JSON (raw numbers, command, commit) and PNG."""

import json
import subprocess
import sys


def test_quick_run_writes_json_and_png(tmp_path):
    out = tmp_path / "kv_cache"
    done = subprocess.run(
        [sys.executable, "experiments/kv_cache.py", "--quick", "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"rows", "summary", "command", "commit", "wall_s"} <= set(result)
    assert [r["length"] for r in result["rows"]] == [16, 32]
    assert all(r["cached_ms"] > 0 and r["recomputed_ms"] > 0 for r in result["rows"])
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
