"""The plain loss's forward in two reads of the logits against XLA's one-read reduction,
forward + backward, on this machine's backend.

    python -m benchmarks.one_read [--repeats 15]

Both run `cross_entropy`'s rows (`_stable.categorical_rows`, the mean loss) with the
same backward; only the row statistics differ: `_stable.logit_stats` (the row max,
then the sums) and `jaxent._one_read` through `row_stats.kernel_stats(xla=True)` (one
variadic reduction). The default takes the one-read reduction on accelerators other
than CUDA and two reads on CPU; this is the CPU measurement behind that choice (on an
accelerator, `python -m benchmarks --suite plain` times it as "jaxent one-read xla").
Prints the median times and the ratio one-read / two-read, with and without
label smoothing and a soft-cap.
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
import jax.numpy as jnp

from .timing import median_seconds

CASES = [(4096, 1000, "float32"), (1024, 32000, "float32"), (1024, 32000, "bfloat16")]
OPTIONS = {"plain": {}, "smoothing + softcap": dict(label_smoothing=0.1, softcap=30.0)}


def main(argv=None) -> None:
    from jaxent import _stable
    from jaxent.pallas import row_stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    stats = {
        "two reads": _stable.logit_stats,
        "one read": functools.partial(row_stats.kernel_stats, xla=True),
    }
    device = jax.devices()[0]
    print(f"{device.device_kind} ({platform.processor() or platform.machine()}), "
          f"jax {jax.__version__}, forward + backward of the mean loss, median of "
          f"{args.repeats}")  # fmt: skip
    print("| N | C | dtype | options | two reads ms | one read ms | one / two |")
    print("|---|---|---|---|---|---|---|")
    for n, c, dtype in CASES:
        kx, ky = jax.random.split(jax.random.PRNGKey(0))
        x = (jax.random.normal(kx, (n, c), jnp.float32) * 3).astype(dtype)
        y = jax.random.randint(ky, (n,), 0, c, jnp.int32)
        for name, opts in OPTIONS.items():

            def step(fn, opts=opts):
                def loss(logits, labels):
                    rows = _stable.categorical_rows(logits, labels, stats=fn, **opts)
                    return jnp.mean(rows.loss)

                return jax.jit(jax.value_and_grad(loss))

            fns = {k: step(fn) for k, fn in stats.items()}
            t = median_seconds(fns, dict.fromkeys(fns, (x, y)), args.repeats)
            two, one = t["two reads"] * 1e3, t["one read"] * 1e3
            print(f"| {n} | {c} | {dtype} | {name} | {two:.1f} | {one:.1f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
