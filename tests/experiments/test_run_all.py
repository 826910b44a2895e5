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


def test_table_shows_the_committed_results_with_the_earlier_experiments(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results -->\n<!-- /results -->\n")
    cmd = [sys.executable, "experiments/run_all.py", "--table-only", "--readme", str(readme)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = readme.read_text()
    for name in ("positions", "attention_heads", "norms_mlp", "kv_cache", "precision", "memory_parallelism"):
        assert f"| `{name}.py`" in text, name
    for name in ("tokenization", "scaling", "peft_compare", "align_curves"):
        assert f"| `{name}.py`" in text, name
    assert "lora_r8" in text and "GRPO reward" in text
    assert "with the fine-tuning and alignment runs" in text
