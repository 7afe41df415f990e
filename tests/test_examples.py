"""Smoke test of examples/mlp_digits.py: trains end to end and writes sane outputs."""

import importlib.util
import json
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mlp_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("mlp_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlp_digits_trains_and_writes_outputs(tmp_path):
    metrics = _load().main(["--epochs", "4", "--quiet", "--out", str(tmp_path)])
    losses = [h["loss"] for h in metrics["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert 0.5 < metrics["test_accuracy"] <= 1.0  # chance is 0.1
    assert (tmp_path / "loss.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    assert len(saved["test"]["recall"]) == 10


def test_class_weights_report(tmp_path):
    metrics = _load().main(["--epochs", "3", "--quiet", "--class-weights", "--out", str(tmp_path)])
    report = metrics["class_weights"]
    counts = report["class_counts"]
    assert min(counts[:5]) < max(counts[5:]) / 4  # the subset is imbalanced
    weights = report["class_weights"]
    assert weights[0] > weights[9]  # rare classes weigh more
    for name in ("unweighted", "weighted"):
        assert len(report[name]["test"]["recall"]) == 10
        assert all(0 <= r <= 1 for r in report[name]["test"]["recall"])


def test_batches_mask_the_padding_of_the_last_batch():
    """10 examples in batches of 4: masks of 4, 4 and 2 kept rows, every batch the same
    shape, and the kept rows are each example exactly once (padding repeats one)."""
    import numpy as np

    module = _load()
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    out = list(module.batches(x, y, 4, np.random.default_rng(0)))
    assert [int(mask.sum()) for _, _, mask in out] == [4, 4, 2]
    assert all(xb.shape == (4, 1) and yb.shape == mask.shape == (4,) for xb, yb, mask in out)
    kept = np.concatenate([yb[mask] for _, yb, mask in out])
    assert sorted(kept.tolist()) == list(range(10))
