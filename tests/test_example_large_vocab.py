"""Smoke test of examples/large_vocab.py: both implementations train identically."""

import importlib.util
import json
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "large_vocab.py"


def _load():
    spec = importlib.util.spec_from_file_location("large_vocab", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_vocab_example_runs_and_curves_agree(tmp_path):
    argv = ["--steps", "8", "--vocab", "8192", "--tokens", "2048", "--out", str(tmp_path)]
    summary = _load().main(argv)
    xla, default = summary["xla"]["losses"], summary["default"]["losses"]
    assert len(xla) == len(default) == 8
    assert all(math.isfinite(v) for v in xla + default)
    assert default[-1] < default[0]  # it learns
    assert summary["max_loss_gap"] < 1e-4 * max(xla)
    if summary["xla"]["temp_bytes"] is not None:
        assert summary["default"]["temp_bytes"] < summary["xla"]["temp_bytes"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["max_loss_gap"] == summary["max_loss_gap"]
