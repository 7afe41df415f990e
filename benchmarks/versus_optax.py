"""jaxent.cross_entropy vs optax, forward + backward, side by side in fresh processes.

    python -m benchmarks.versus_optax [--processes 10] [--rounds 200]

For each case (N=4096 C=1000 float32 and N=1024 C=32000 bfloat16, the foundation
issue's) every process times `jax.value_and_grad` of the mean loss of jaxent, of
jaxent again under another name (an identical function: its ratio shows the noise of
the method), and of optax, in turns in a random order per round, and reports median
ratios. On a shared CPU one process's ratio moves by several percent; the median over
processes is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

CASES = [(4096, 1000, "float32"), (1024, 32000, "bfloat16")]


def one_process(n: int, c: int, dtype: str, rounds: int) -> dict:
    import jax
    import optax

    import jaxent

    from .plain import inputs

    x, y = inputs(n, c, dtype)
    fns = {
        "jaxent": lambda x, y: jaxent.cross_entropy(x, y),
        "jaxent (same function)": lambda x, y: jaxent.cross_entropy(x, y),
        "optax": lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean(),
    }
    steps = {k: jax.jit(jax.value_and_grad(f)) for k, f in fns.items()}
    for step in steps.values():
        jax.block_until_ready(step(x, y))
    times = {k: [] for k in steps}
    order, rng = list(steps), random.Random()
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            start = time.perf_counter()
            jax.block_until_ready(steps[k](x, y))
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {k: med[k] / med["optax"] for k in med if k != "optax"} | {"optax_s": med["optax"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.versus_optax", description=__doc__)
    p.add_argument("--processes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, c, dtype = args.child
        print(json.dumps(one_process(int(n), int(c), dtype, args.rounds)))
        return
    for n, c, dtype in CASES:
        runs = []
        for _ in range(args.processes):
            cmd = [sys.executable, "-m", "benchmarks.versus_optax", "--rounds", str(args.rounds),
                   "--child", str(n), str(c), dtype]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        for name in ("jaxent", "jaxent (same function)"):
            ratios = sorted(r[name] for r in runs)
            spread = f"min {ratios[0]:.3f}, max {ratios[-1]:.3f}"
            print(f"N={n} C={c} {dtype}: {name} / optax = {statistics.median(ratios):.3f} "
                  f"(median of {len(ratios)} processes; {spread})")  # fmt: skip
        optax_ms = statistics.median(r["optax_s"] for r in runs) * 1e3
        print(f"N={n} C={c} {dtype}: optax median {optax_ms:.2f} ms")


if __name__ == "__main__":
    main()
