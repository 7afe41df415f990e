"""The row-statistics kernel of `row_stats.py` for TPUs (Pallas' Mosaic TPU lowering).

Same results (`row_stats.Out`) from the same `_stable` formulas, in the shape a TPU
kernel takes: Mosaic has no masked loads and moves whole blocks between HBM and the
core's vector memory, so the grid is two-dimensional,

    grid = (row blocks, class blocks);   block (i, j) = logits[rows i, classes j]

with the class axis innermost and sequential ("arbitrary"): each row block's outputs
stay in vector memory across j (their block index does not move with j) and carry the
online log-sum-exp — zeroed at j = 0, rescaled and added to at every j, written back
to HBM once. A ragged last block reads past the array's end: its columns beyond C are
set to dropped logits (-inf, zero target, zero weight) before any arithmetic, and its
rows beyond N are computed and then discarded by the clipped write-back.

Blocks are (8k, 128m) as the TPU's (8, 128) tiles of 32-bit words want, or the whole
axis when it is shorter; each block is worked through `CHUNK` rows at a time, so the
formulas' float32 temporaries stay small while the block (what one grid step moves)
stays large. Per logit the kernel reads the logit (the target, the mask) once and
writes nothing, like the Triton kernel. Outputs are (N, 1) columns, the layout of the
row reductions' results (rows along the sublanes); compiled for a v5p, XLA stores each
in (8, 128) tiles, 512 bytes per row (for a v4, v5e or v6e, the kernel's whole temp
is under 1 MiB at N=8192).

Compiled for a v5p (`python -m benchmarks.deviceless --target v5p`): forward + backward
of `cross_entropy` at N=8192, C=128256 moves 3 logits-sized arrays where XLA moves 4.
With C not a multiple of 128, XLA:TPU lays the logits out column-major and copies them
for the kernel (C=1000: 5). Not timed on a TPU, hence opt-in (`jaxent.pallas`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._stable import class_sums, kept, online_add, prepare_logits, soft_sums
from .row_stats import Out, argmax_step

# Default block: 512 rows x 2048 classes (2 MiB of bfloat16 logits per step, against
# a grid step's fixed cost of a fraction of a microsecond), worked through CHUNK rows
# at a time so that the float32 temporaries of the formulas (a few dozen bytes per
# logit with every option) stay far inside the 16 MiB of vector memory a kernel may
# use by default (compiled for a v5p: 512 x 2048 at once needs up to 30 MiB).
BLOCK_ROWS, BLOCK_CLASSES, CHUNK = 512, 2048, 32
BLOCK_BYTES = 4 << 20


def tile_sizes(n: int, c: int, block_rows: int | None, block_classes: int | None,
               bytes_per_logit: int = 2):  # fmt: skip
    """(block_rows, block_classes, chunk): the defaults or the overrides (powers of two),
    raised to the TPU's (8, 128) tile; classes lowered to C when that is shorter, rows
    to N rounded up to the tile; `chunk` rows (dividing block_rows) at a time. Default
    rows are halved until a block of the inputs (`bytes_per_logit` summed over them)
    takes at most BLOCK_BYTES: the inputs are double-buffered."""
    classes = max(128, block_classes or BLOCK_CLASSES)
    classes = c if c <= classes else classes
    rows = max(8, block_rows or BLOCK_ROWS)
    while block_rows is None and rows > 8 and rows * classes * bytes_per_logit > BLOCK_BYTES:
        rows //= 2
    rows = min(rows, -(-n // 8) * 8)
    chunk = min(CHUNK, rows & -rows)  # the largest power of two dividing rows, <= CHUNK
    return rows, classes, chunk


class Chunk(NamedTuple):
    """Rows [r * size, (r + 1) * size) of a kernel's block (`each_chunk`): `at` slices
    them; `now` / `store` read and write their entries of a (rows, 1) column ref."""

    r: Any
    at: Any

    def now(self, ref):
        return ref[self.at, :][:, 0]

    def store(self, ref, value):
        ref[self.at, :] = value[:, None]


def each_chunk(rows: int, size: int, body) -> None:
    """body(Chunk) for each `size` rows of a block of `rows`, in a loop."""

    def step(r, _):
        body(Chunk(r, pl.ds(pl.multiple_of(r * size, size), size)))

    # int32 bounds: Mosaic has no 64-bit integers, which Python ints become under x64.
    lax.fori_loop(jnp.int32(0), jnp.int32(rows // size), step, None)


def int8_mask(mask):
    """A boolean mask as a kernel takes it: Pallas would pass bool as int32 (4 bytes an
    entry); int8 is 1. Read back with `ref[...] != 0`."""
    return None if mask is None else mask.astype(jnp.int8)


def _start(out: Out) -> Out:
    """The accumulators before the first block of classes: no max, no argmax, no sums."""

    def empty(ref, fill):
        return None if ref is None else jnp.full(ref.shape, fill, ref.dtype)

    return Out(
        best=empty(out.best, -jnp.inf),
        first=empty(out.first, 0),
        sums=jax.tree.map(lambda r: empty(r, 0), out.sums),
        target_best=empty(out.target_best, -jnp.inf),
        target_first=empty(out.target_first, 0),
    )


def _kernel(x_ref, t_ref, mask_ref, w_ref, out: Out, key, *, c, chunk, config):
    """Block (i, j): accumulate into the row block's resident `out` ((rows, 1) refs),
    `chunk` rows at a time. Inputs: blocks of the logits, targets and int8 mask,
    (1, classes) float32 weights, each but the logits possibly None. `key`: with the
    argmax, a (rows, 1) scratch ref holding `argmax_step`'s running key (the max so
    far, NaN once a NaN was seen; the targets' argmax keeps its key in
    `out.target_best`, as the Triton kernel does)."""
    j = pl.program_id(1)
    rows, classes = x_ref.shape
    col = j * classes + lax.broadcasted_iota(jnp.int32, (chunk, classes), 1)
    in_range = col < c
    w = None if w_ref is None else jnp.where(in_range, w_ref[...], 0.0)

    @pl.when(j == 0)
    def _():
        for ref, value in zip(jax.tree.leaves(out), jax.tree.leaves(_start(out)), strict=True):
            ref[...] = value
        if key is not None:
            key[...] = jnp.full(key.shape, -jnp.inf, key.dtype)

    def rows_of(ch: Chunk):
        now, store = ch.now, ch.store

        def load(ref):
            return ref[ch.at, :]

        mask = in_range
        if mask_ref is not None:
            mask = mask & (load(mask_ref).astype(jnp.int32) != 0)
        z = prepare_logits(load(x_ref), mask, config.softcap)

        def first_max(key_ref, first_ref, values):
            new_key, first = argmax_step((now(key_ref), now(first_ref)), values, col)
            store(key_ref, new_key)
            store(first_ref, first)

        if out.first is not None:
            first_max(key, out.first, z)
        if t_ref is None:
            tile_sums = functools.partial(class_sums, z, w=w, smoothing=config.smoothing)
        else:
            t = jnp.where(in_range, load(t_ref).astype(z.dtype), 0.0)
            tile_sums = functools.partial(soft_sums, z, t, w=w, smoothing=config.smoothing)
            if out.target_first is not None:  # target_best is this argmax's key
                first_max(out.target_best, out.target_first, jnp.where(kept(z), t, -jnp.inf))
        sums, best = online_add(
            jax.tree.map(now, out.sums), now(out.best), jnp.max(z, axis=-1), tile_sums
        )
        store(out.best, best)
        for ref, value in zip(jax.tree.leaves(out.sums), jax.tree.leaves(sums), strict=True):
            store(ref, value)

    each_chunk(rows, chunk, rows_of)


def call(config, x, t, mask, weights, out_shape: Out) -> Out:
    """The kernel on (N, C) logits; (N, C) targets, (N, C) mask and (C,) float32
    weights, each or None. `out_shape`: an `Out` of (N, 1) types; returns (N,) arrays."""
    n, c = x.shape
    inputs = [a.dtype.itemsize for a in (x, t) if a is not None] + [1] * (mask is not None)
    rows, classes, chunk = tile_sizes(n, c, config.block_rows, config.block_classes, sum(inputs))
    block = pl.BlockSpec((rows, classes), lambda i, j: (i, j))
    in_specs = [
        block,
        None if t is None else block,
        None if mask is None else block,
        None if weights is None else pl.BlockSpec((1, classes), lambda i, j: (0, j)),
    ]
    out_specs = jax.tree.map(lambda _: pl.BlockSpec((rows, 1), lambda i, j: (i, 0)), out_shape)
    kernel = functools.partial(_kernel, c=c, chunk=chunk, config=config)
    with_key = out_shape.first is not None
    outs = pl.pallas_call(
        lambda *refs: kernel(*refs[:4], Out(*refs[4:9]), refs[9] if with_key else None),
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32)] if with_key else [],
        grid=(pl.cdiv(n, rows), pl.cdiv(c, classes)),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=config.interpret,
        name="jaxent_row_stats_tpu",
    )(
        x,
        t,
        int8_mask(mask),
        None if weights is None else weights.reshape(1, c),
    )
    return jax.tree.map(lambda a: a[:, 0], outs)
