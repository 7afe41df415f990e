"""`python -m benchmarks --quick` runs on CPU and writes a complete, consistent JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--no-torch", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    for key in ("device", "jax", "jaxlib", "command", "shapes", "repeats"):
        assert env[key]
    rows = data["results"]
    suites = {r["suite"] for r in rows}
    assert suites == {"plain", "linear"}
    impls = {r["implementation"] for r in rows}
    assert {"jaxent", "optax", "jaxent chunked", "jaxent lean"} <= impls
    for r in rows:
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        assert math.isclose(r["ratio"], r["seconds"] / r["floor_seconds"])
        assert r["loss_rel_err"] < 1e-2 and r["grad_rel_err"] < 5e-2
        assert r["temp_bytes"] is None or r["temp_bytes"] >= 0
    assert (tmp_path / "results.md").read_text().count("\n|") >= len(rows)
    assert (tmp_path / "results.png").stat().st_size > 1000
