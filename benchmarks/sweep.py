"""Tile and block-size sweeps, for tuning the defaults on an accelerator.

    python -m benchmarks.sweep row_stats   # Pallas forward kernel: (block_rows, block_classes)
    python -m benchmarks.sweep chunked [--heads llama3 gemma2]  # tokens per block
    python -m benchmarks.sweep lean [--heads llama3 gemma2]     # "lean": classes per block
    python -m benchmarks.sweep pallas [--heads ...]  # fused-head kernels: tiles, classes per block

Each line is a time over the floor measured in the same run (row_stats: one read +
write pass over the logits, so the ideal for a read-only forward is 0.5; chunked and
lean: the three matmuls of forward + backward), and the compiled temp memory. The
defaults in jaxent are what the first GPU sweep should confirm or replace.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxent
import jaxent.pallas

from . import linear, plain
from .memory import block_label
from .timing import measure

LLAMA3 = (8192, 4096, 128256)


def _drop_executables(results: dict) -> dict:
    return {k: {f: v for f, v in r.items() if f != "compiled"} for k, r in results.items()}


# The forward kernel's (rows, classes) per tile.
ROW_STATS_TILES = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (2, 2048),
                   (2, 4096), (4, 1024), (4, 2048), (8, 512)]  # fmt: skip


def row_stats(repeats: int) -> list[dict]:
    from jaxent.pallas.row_stats import kernel_stats

    n, c = LLAMA3[0], LLAMA3[2]
    x, y = plain.inputs(n, c, jnp.bfloat16)

    def forward(block_rows, block_classes):
        def f(x, y):
            stats = kernel_stats(x, y, 0, None, None, softcap=None, smoothing=False,
                                 with_argmax=False, block_rows=block_rows,
                                 block_classes=block_classes)  # fmt: skip
            return stats[0].s

        return f

    fns = {"floor": lambda x, y: 2 * x}
    fns.update({f"rows={r} classes={k}": forward(r, k) for r, k in ROW_STATS_TILES})
    results = _drop_executables(measure(fns, dict.fromkeys(fns, (x, y)), repeats))
    floor = results.pop("floor")["seconds"]
    return [{"case": k, "N": n, "C": c, "ratio": v["seconds"] / floor, **v}
            for k, v in results.items()]  # fmt: skip


HEADS = {"llama3": (8192, 4096, 128256), "gemma2": (8192, 2304, 256000)}
# "chunked": tokens per block, or (per block, per sub-block of float32 logits).
SIZES = {
    "chunked": [1024, (2048, 2048), (2048, 1024), (2048, 512), (4096, 512)],
    "lean": [2048, 4096, 8192, 16384],
}
# "pallas": (classes per block, (rows, classes, depth) per kernel tile).
PALLAS = [(2048, (64, 128, 64)), (8192, (64, 128, 64)), (2048, (128, 128, 64)),
          (2048, (64, 256, 64)), (2048, (128, 256, 32)), (2048, (64, 128, 32)),
          (2048, (128, 64, 64))]  # fmt: skip


def blocks(impl: str, sizes, repeats: int, head=LLAMA3) -> list[dict]:
    n, d, v = head
    x, w, y = linear.inputs(n, d, v, jnp.bfloat16)
    g = (jax.random.normal(jax.random.PRNGKey(1), (n, v), jnp.float32) * 1e-3).astype(x.dtype)

    def step(block, tile=None):
        def loss(x, w, y):
            if tile is None:
                return jaxent.linear_cross_entropy(x, w, y, implementation=impl, block_size=block)
            rows, classes, depth = tile
            with jaxent.pallas.tiles(block_rows=rows, block_classes=classes, block_depth=depth):
                return jaxent.linear_cross_entropy(x, w, y, implementation=impl, block_size=block)

        return jax.value_and_grad(loss, argnums=(0, 1))

    fns = {"floor": linear.three_matmuls}
    if impl == "pallas":
        fns.update({f"pallas block={b} tile={t}": step(b, t) for b, t in sizes})
    else:
        fns.update({f"{impl} block={block_label(b)}": step(b) for b in sizes})
    args = {k: (x, w, g) if k == "floor" else (x, w, y) for k in fns}
    results = _drop_executables(measure(fns, args, repeats))
    floor = results.pop("floor")["seconds"]
    return [{"case": k, "N": n, "D": d, "V": v, "ratio": r["seconds"] / floor, **r}
            for k, r in results.items()]  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    p.add_argument("what", choices=["row_stats", "chunked", "lean", "pallas"])
    p.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=["llama3"],
                   help="LM heads (N=8192, bf16) for the chunked and lean sweeps")  # fmt: skip
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    for head in ["-"] if args.what == "row_stats" else args.heads:
        if args.what == "row_stats":
            new = row_stats(args.repeats)
        else:
            sizes = PALLAS if args.what == "pallas" else SIZES[args.what]
            new = blocks(args.what, sizes, args.repeats, HEADS[head])
        for r in new:
            shape = f"D={r['D']} V={r['V']}" if "D" in r else f"C={r['C']}"
            ms, mib = r["seconds"] * 1e3, r["temp_bytes"] / 2**20
            print(f"{shape:16s} {r['case']:28s} {r['ratio']:6.3f} x floor  {ms:8.2f} ms  "
                  f"temp {mib:9.1f} MiB")  # fmt: skip
        rows += new
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            device = str(jax.devices()[0])
            args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
