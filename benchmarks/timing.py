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


def temp_bytes(compiled) -> int | None:
    """Compiled temporary memory (`memory_analysis().temp_size_in_bytes`)."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def _memory_stats() -> dict:
    return jax.devices()[0].memory_stats() or {}


def peak_extra_bytes(run) -> int | None:
    """Bytes the device's peak rose above what was in use before `run()` (GPU/TPU; None
    on CPU). JAX cannot reset the peak, so only a rise above every earlier peak of the
    process is seen: None also when the peak did not rise. Measure the leanest
    functions first."""
    before = _memory_stats()
    run()
    after = _memory_stats()
    if "peak_bytes_in_use" not in after:
        return None
    if after["peak_bytes_in_use"] <= before.get("peak_bytes_in_use", 0):
        return None
    return after["peak_bytes_in_use"] - before["bytes_in_use"]


def notice(name, err) -> None:
    print(f"  {name}: skipped ({type(err).__name__}: {str(err)[:160]})")


def measure(fns: dict, args: dict, repeats: int, skip=notice) -> dict:
    """{name: {"seconds", "temp_bytes", "peak_bytes", "compiled"}} for each function
    that compiles and runs, in the order of `fns` (put the leanest first: see
    `peak_extra_bytes`). Each function is compiled once; "compiled" is the executable,
    for the caller's accuracy checks. `skip(name, err)` is told of each one that
    raises (e.g. out of memory)."""
    ok, peaks = {}, {}
    for name, fn in fns.items():
        try:
            compiled = jax.jit(fn).lower(*args[name]).compile()
            peaks[name] = peak_extra_bytes(lambda c=compiled, a=args[name]: _once(c, a))
        except Exception as err:  # e.g. out of memory for a materialised baseline
            skip(name, err)
            continue
        ok[name] = compiled
    seconds = median_seconds(ok, args, repeats)
    return {
        name: {
            "seconds": seconds[name],
            "temp_bytes": temp_bytes(ok[name]),
            "peak_bytes": peaks[name],
            "compiled": ok[name],
        }
        for name in ok
    }
