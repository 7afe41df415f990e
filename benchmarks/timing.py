"""Timing and memory of compiled JAX functions, the same way for every case."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, args, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn(*args)` after warm-up, synchronised on the device."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temp_bytes(jitted, args) -> int | None:
    """Compiled temporary memory (`memory_analysis().temp_size_in_bytes`)."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def peak_bytes() -> int | None:
    """Device peak bytes in use so far (GPU/TPU; None on CPU). Not reset between cases:
    a case's value is the running peak of the process."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(fn, args, repeats: int) -> dict:
    jitted = jax.jit(fn)
    seconds = median_seconds(jitted, args, repeats)
    return {"seconds": seconds, "temp_bytes": temp_bytes(jitted, args), "peak_bytes": peak_bytes()}
