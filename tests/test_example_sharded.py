"""Smoke test of examples/sharded.py: the sharded head trains and matches one device.

conftest.py already gives this process 8 CPU devices, so the example runs in-process.
"""

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharded.py"


def _load():
    spec = importlib.util.spec_from_file_location("sharded_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sharded_example_trains_and_matches_one_device():
    summary = _load().main(["--steps", "12", "--vocab", "512", "--tokens", "256"])
    losses = summary["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert summary["gap"] < 1e-5  # step 0: sharded == single-device loss
    assert losses[-1] < losses[0] - 0.05  # it learns
