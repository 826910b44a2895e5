"""experiments/memory_parallelism.py --quick: the shards measured on 8 emulated devices match `jaxlm plan`."""

import json
import os
import subprocess
import sys


def test_quick_run_measures_the_layouts_as_plan_does(tmp_path):
    out = tmp_path / "memory_parallelism"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script asks for its 8 devices
    done = subprocess.run(
        [sys.executable, "experiments/memory_parallelism.py", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"rows", "summary", "devices", "command", "commit", "wall_s"} <= set(result) and result["devices"] == 8
    rows = {r["layout"]: r for r in result["rows"]}
    assert rows["data=8 (ZeRO-0)"]["state_vs_replicated"] == 1.0
    assert rows["fsdp=8 ZeRO-3"]["state_vs_replicated"] < 0.2  # parameters and moments split 8 ways
    assert all(r["plan_relative_error"] < 0.01 for r in rows.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
