"""Runs a gallery experiment in --quick mode in its own process and reads back what it wrote."""

import json
import subprocess
import sys

import pytest

PNG = b"\x89PNG\r\n\x1a\n"
COMMON = {"rows", "summary", "steps", "command", "commit", "wall_s"}  # every training experiment's JSON


@pytest.fixture
def quick(tmp_path):
    def run(name: str) -> dict:
        out = tmp_path / name
        cmd = [sys.executable, f"experiments/{name}.py", "--quick", "--root", str(tmp_path / "runs")]
        done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.with_suffix(".png").read_bytes()[:8] == PNG
        result = json.loads(out.with_suffix(".json").read_text())
        assert COMMON <= set(result) and result["summary"]
        return result

    return run
