"""What every gallery experiment shares: where results go, and a result file that records its command, commit
and wall time beside the raw numbers (so a committed plot can be traced to the run that drew it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip() or "unknown"


def save(out: Path, result: dict, figure, *, started: float) -> None:
    """Writes out.json (result + command, commit, wall time) and out.png (the matplotlib figure)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **result,
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    figure.savefig(out.with_suffix(".png"), dpi=80)
    print(f"wrote {out.with_suffix('.json')} and .png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
