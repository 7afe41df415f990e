"""Optional PyTorch baselines, run in their own process (JAX and torch must not share
a GPU's memory). Reads cases as JSON on stdin, prints result rows as JSON.

Each baseline is skipped with a notice when its package is missing:
  plain:  torch.nn.functional.cross_entropy
  linear: Liger Kernel's LigerFusedLinearCrossEntropyLoss, Apple's cut_cross_entropy
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _timer(torch, device):
    def median_seconds(fn, repeats):
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def _linear_baselines(device):
    found = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        found["liger fused linear CE"] = lambda x, w, y: loss(w, x, y)
    except ImportError:
        print("notice: liger_kernel not installed, Liger baseline skipped", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        found["cut-cross-entropy"] = lambda x, w, y: cce(x, w, y)
    except ImportError:
        print("notice: cut_cross_entropy not installed, CCE baseline skipped", file=sys.stderr)
    return found if device == "cuda" else {}


def main() -> None:
    try:
        import torch
    except ImportError:
        print("notice: torch not installed, PyTorch baselines skipped", file=sys.stderr)
        print("[]")
        return
    request = json.load(sys.stdin)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    median_seconds = _timer(torch, device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rows = []
    for case in request["plain"]:
        n, c, dtype = case
        x = (torch.randn(n, c, device=device) * 2).to(dtypes[dtype]).requires_grad_()
        y = torch.randint(0, c, (n,), device=device)

        def step(x=x, y=y):
            x.grad = None
            torch.nn.functional.cross_entropy(x, y).backward()

        rows.append({"suite": "plain", "implementation": "torch F.cross_entropy", "N": n,
                     "C": c, "dtype": dtype, "seconds": median_seconds(step, request["repeats"]),
                     "device": f"torch {torch.__version__} {device}"})  # fmt: skip
    linear = _linear_baselines(device)
    for case in request["linear"]:
        n, d, v, dtype = case
        x = torch.randn(n, d, device=device, dtype=dtypes[dtype]).requires_grad_()
        w = (torch.randn(v, d, device=device) / d**0.5).to(dtypes[dtype]).requires_grad_()
        y = torch.randint(0, v, (n,), device=device)
        for name, fn in linear.items():

            def step(fn=fn, x=x, w=w, y=y):
                x.grad = w.grad = None
                fn(x, w, y).backward()

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = median_seconds(step, request["repeats"])
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            rows.append({"suite": "linear", "implementation": name, "N": n, "D": d, "V": v,
                         "dtype": dtype, "seconds": seconds, "peak_bytes": peak,
                         "device": f"torch {torch.__version__} {device}"})  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
