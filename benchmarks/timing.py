"""Timing and memory of compiled JAX functions, the same way for every case."""

from __future__ import annotations

import random
import statistics
import time

import jax


def _once(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_seconds(fns: dict, args: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of each `fns[k](*args[k])` after warm-up, synchronised on the
    device. The functions run in turns, in a new random order each round: a change of
    machine load hits every function alike, and no function always runs after the
    same neighbour (whose cache footprint would bias it), so the ratios stay fair."""
    for _ in range(warmup):
        for k, fn in fns.items():
            _once(fn, args[k])
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            times[k].append(_once(fns[k], args[k]))
    return {k: statistics.median(t) for k, t in times.items()}


def temp_bytes(jitted, args) -> int | None:
    """Compiled temporary memory (`memory_analysis().temp_size_in_bytes`)."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def peak_bytes() -> int | None:
    """Device peak bytes in use so far (GPU/TPU; None on CPU). JAX cannot reset it, so
    it is the running peak of the process: read after each function's first call, in
    the order given (put the leanest first), it bounds that function's peak."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def notice(name, err) -> None:
    print(f"  {name}: skipped ({type(err).__name__}: {str(err)[:120]})")


def measure(fns: dict, args: dict, repeats: int, skip=notice) -> dict:
    """{name: {"seconds", "temp_bytes", "peak_bytes"}} for each function that compiles
    and runs; `skip(name, err)` is told of each one that raises (e.g. out of memory)."""
    ok, peaks = {}, {}
    for name, fn in fns.items():
        jitted = jax.jit(fn)
        try:
            jax.block_until_ready(jitted(*args[name]))
        except Exception as err:  # e.g. out of memory for a materialised baseline
            skip(name, err)
            continue
        ok[name], peaks[name] = jitted, peak_bytes()
    seconds = median_seconds(ok, args, repeats)
    return {
        name: {
            "seconds": seconds[name],
            "temp_bytes": temp_bytes(ok[name], args[name]),
            "peak_bytes": peaks[name],
        }
        for name in ok
    }
