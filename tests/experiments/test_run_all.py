"""experiments/run_all.py: runs the chosen experiments and rebuilds the README's results table."""

import subprocess
import sys


def test_run_all_rebuilds_the_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# gallery\n\n<!-- results -->\nold\n<!-- /results -->\n\nthe rest\n")
    cmd = [sys.executable, "experiments/run_all.py", "--quick", "--only", "kv_cache"]
    done = subprocess.run([*cmd, "--out-dir", str(tmp_path), "--readme", str(readme)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = readme.read_text()
    assert "old" not in text and text.endswith("the rest\n")
    assert "| `kv_cache.py`: KV cache" in text and "Total wall time" in text
    bad = subprocess.run([*cmd[:-1], "nonsense"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown experiments" in bad.stderr
