"""The fused-head kernels of `fused_head.py` for TPUs (Pallas' Mosaic TPU lowering).

Same two steps of "lean"'s scheme per block of Bv classes, same results
(`fused_head.StatsOut`; dlogits and the bias' column sums), same `_stable` formulas;
only the form is a TPU kernel's. Mosaic moves whole blocks between HBM and the core's
vector memory and has no masked loads, so each kernel is a three-dimensional grid,

    grid = (row blocks i, class tiles j, depth steps k);
    acc[i, j] += x[rows i, depth k] @ w[classes j, depth k].T     (float32, on the MXU)

with the depth innermost: the (rows x classes) float32 accumulator lives in a scratch
buffer of vector memory, zeroed at k = 0, and at the last k its logits are finished on
chip, `CHUNK` rows at a time (the formulas' float32 temporaries stay small):

- stats: the online log-sum-exp of the row block's resident outputs ((rows, 1) columns
  whose block index does not move with j or k; the class axis is sequential) takes the
  tile, as in `row_stats_tpu.py`; nothing (rows x classes)-sized is written;
- grad: the tile's logits' gradient (`_stable.partial_grad`) is written once, in the
  matmul dtype, with its column sums for the bias (one (1, classes) row per row block).

Ragged edges read past the arrays' ends (Mosaic pads the last block with unspecified
values): classes beyond Bv are dropped logits before any arithmetic, rows beyond N are
computed and then discarded by the clipped write-back (and left out of the bias'
column sums), and a ragged last depth step zeroes both operands' columns beyond D so
the products stay exact.

float32 inputs take float32 products (`Precision.HIGHEST`, several MXU passes),
bfloat16 inputs bf16 products with float32 accumulation, as on the GPU. (XLA's default
for float32 matmuls on a TPU is one bfloat16 pass: the dx and dw matmuls of "lean",
which follow `jax_default_matmul_precision`, are then less exact than these logits.)

Compiled for TPUs without one (`python -m benchmarks.deviceless --target v5p`; v4,
v5e, v6e too): at the bf16 Llama-3 head, N=8192, forward + backward take 149 MiB of
temp (3.7% of the float32 logits) and move 6 bytes per logit through device memory
around the matmuls, where XLA's "lean" moves 17 (`hlo.loop_passes`). On a v5e or v6e
XLA keeps "lean"'s blocks in on-chip memory (0 bytes), so the kernels are not expected
to help there (the README has the table). Never timed on a TPU, hence opt-in
(`implementation="pallas"`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .._stable import (
    Partial,
    class_sums,
    online_add,
    partial_grad,
    prepare_logits,
    tile_label_terms,
)
from .fused_head import StatsOut
from .row_stats import _like, argmax_step
from .row_stats_tpu import Chunk, each_chunk, int8_mask

# Default tile: 512 rows x 1024 classes of float32 logits (a 2 MiB accumulator), the
# hidden size 512 at a time (256 for float32 inputs, whose blocks are twice the bytes):
# 341 flops per byte of x and w moved, above a v5e's ratio of peak flops to bandwidth
# (~240) though below a v6e's (~560), and with every option within the 16 MiB of
# vector memory a kernel may use by default. Unmeasured on a TPU. Rows are multiples
# of 32, the tile of int8 (the logit mask) and a multiple of bfloat16's 16.
BLOCK_ROWS, BLOCK_CLASSES, BLOCK_DEPTH, CHUNK = 512, 1024, 512, 32


def tile_sizes(n: int, v: int, d: int, config, itemsize: int = 2):
    """(rows, classes, depth, chunk): the defaults or the overrides (powers of two),
    raised to the TPU's tiles (rows 32, classes and depth 128); classes and depth
    lowered to Bv and D when those are shorter (a whole axis is always a valid block),
    rows to N rounded up to 32; `chunk` rows (dividing rows) at a time."""
    rows = max(32, config.block_rows or BLOCK_ROWS)
    rows = min(rows, -(-n // 32) * 32)
    classes = max(128, config.block_classes or BLOCK_CLASSES)
    depth = max(128, config.block_depth or BLOCK_DEPTH // max(1, itemsize // 2))
    chunk = min(CHUNK, rows & -rows)
    return rows, v if v <= classes else classes, d if d <= depth else depth, chunk


def _accumulate(x_ref, w_ref, acc_ref, d: int, k):
    """acc (+)= depth step k's x @ w.T, in float32."""
    x, w = x_ref[...], w_ref[...]
    if w.ndim == 3:  # runs of g classes (`fused_head.Operands.block`), joined
        w = w.reshape(-1, w.shape[-1])
    depth = x.shape[1]
    if d % depth:  # a ragged last step: columns beyond D are unspecified
        ok = k * depth + lax.broadcasted_iota(jnp.int32, (1, depth), 1) < d
        x, w = jnp.where(ok, x, 0), jnp.where(ok, w, 0)
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    product = lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )

    @pl.when(k == 0)
    def _():
        acc_ref[...] = product

    @pl.when(k > 0)
    def _():
        acc_ref[...] += product


class _Chunk:
    """A chunk of rows (`row_stats_tpu.Chunk`) of class tile j: their logits, which are
    kept, and loads/stores of the row block's (rows, 1) columns. (The program ids are
    read at the kernel's top level: the interpreter does not see them inside a loop.)"""

    def __init__(self, ch: Chunk, j, chunk, v, refs, acc_ref):
        x_ref, w_ref, bias_ref, cw_ref, cm_ref, lm_ref, labels_ref = refs
        self.r, self.at, self.now, self.store = ch.r, ch.at, ch.now, ch.store
        classes = acc_ref.shape[1]
        self.col = j * classes + lax.broadcasted_iota(jnp.int32, (chunk, classes), 1)
        z = acc_ref[self.at, :]
        if bias_ref is not None:
            z = z + bias_ref[...]
        keep = (self.col < v) & (cm_ref[...] != 0)
        if lm_ref is not None:
            keep = keep & (lm_ref[self.at, :].astype(jnp.int32) != 0)
        self.z, self.keep = z, keep
        self.weights = None if cw_ref is None else jnp.where(self.col < v, cw_ref[...], 0.0)
        self.labels = self.now(labels_ref)


def _stats_kernel(_, *refs, v, d, chunk, config):
    ins, acc_ref = refs[:7], refs[11]
    out = StatsOut(*refs[7:11])  # of (rows, 1) refs
    j, k, last = pl.program_id(1), pl.program_id(2), pl.num_programs(2) - 1

    @pl.when((j == 0) & (k == 0))
    def _():
        for ref in jax.tree.leaves(out):
            empty = -jnp.inf if ref is out.best or ref is out.key else 0
            ref[...] = jnp.full(ref.shape, empty, ref.dtype)

    _accumulate(ins[0], ins[1], acc_ref, d, k)

    @pl.when(k == last)
    def _():
        def rows_of(ch):
            c = _Chunk(ch, j, chunk, v, ins, acc_ref)
            z = prepare_logits(c.z, c.keep, config.softcap)
            # The label's logit and weight: one compare per logit, on chip.
            labelled = tile_label_terms(z, c.col, c.labels, c.col < v, c.weights)

            def tile_sums(m):
                return class_sums(z, m, c.weights, config.smoothing)._replace(**labelled)

            if out.first is not None:
                key, first = argmax_step((c.now(out.key), c.now(out.first)), z, c.col)
                c.store(out.key, key)
                c.store(out.first, first)
            sums, best = online_add(jax.tree.map(c.now, out.sums), c.now(out.best),
                                    jnp.max(z, axis=-1), tile_sums)  # fmt: skip
            c.store(out.best, best)
            for ref, value in zip(jax.tree.leaves(out.sums), jax.tree.leaves(sums), strict=True):
                c.store(ref, value)

        each_chunk(acc_ref.shape[0], chunk, rows_of)


def _grad_kernel(_, *refs, n, v, d, chunk, config):
    ins, (s_ref, zl_ref, bm_ref, m_ref) = refs[:7], refs[7:11]
    dl_ref, db_ref, acc_ref = refs[11:]
    i, j, k, last = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.num_programs(2) - 1
    _accumulate(ins[0], ins[1], acc_ref, d, k)

    @pl.when(k == last)
    def _():
        rows, classes = acc_ref.shape
        if db_ref is not None:
            db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)

        def rows_of(ch):
            c = _Chunk(ch, j, chunk, v, ins, acc_ref)
            row = i * rows + c.r * chunk + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
            row_ok = row < n  # (chunk, 1): Mosaic cannot reshape booleans (`column`)
            ct = Partial(s=c.now(s_ref), z_label=c.now(zl_ref), label_hits=None,
                         below_max=None if bm_ref is None else c.now(bm_ref))  # fmt: skip
            # `hit` may be True on every row: a dropped label logit is zeroed by `keep`.
            dz = partial_grad(ct, c.z, c.labels, j * classes,
                              c.now(m_ref), c.weights, c.keep, row_ok[:, 0], config.softcap,
                              config.smoothing, None)  # fmt: skip
            dz = jnp.where(row_ok, dz, 0)  # rows beyond N hold anything
            dl_ref[c.at, :] = dz.astype(dl_ref.dtype)
            if db_ref is not None:
                db_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

        each_chunk(acc_ref.shape[0], chunk, rows_of)


def _num_classes(ops) -> int:
    return ops.class_mask.shape[0]  # Bv (w may be the whole grouped view)


def _specs(ops, tiles):
    """BlockSpecs of `fused_head.Operands` (per-class operands as (1, Bv) rows, labels
    as an (N, 1) column) and the arrays in that form. Index maps take the grid's
    (i, j, k) and the scalar-prefetched block index."""
    rows, classes, depth, _ = tiles

    def per_class(a, dtype=jnp.float32):
        return None if a is None else a.astype(dtype).reshape(1, -1)

    arrays = (
        ops.x,
        ops.w,
        per_class(ops.bias),
        per_class(ops.class_weights),
        per_class(ops.class_mask, jnp.int32),
        int8_mask(ops.logit_mask),
        ops.labels.astype(jnp.int32).reshape(-1, 1),
    )
    if ops.block is None:
        w_spec = pl.BlockSpec((classes, depth), lambda i, j, k, b: (j, k))
    else:  # tile j of block b: runs j * classes / g ... of [:, b] (a strided read)
        group = ops.w.shape[2]
        w_spec = pl.BlockSpec((classes // group, None, group, depth),
                              lambda i, j, k, b: (j, b[0], 0, k))  # fmt: skip
    class_row = pl.BlockSpec((1, classes), lambda i, j, k, b: (0, j))
    specs = (
        pl.BlockSpec((rows, depth), lambda i, j, k, b: (i, k)),
        w_spec,
        class_row,
        class_row,
        class_row,
        pl.BlockSpec((rows, classes), lambda i, j, k, b: (i, j)),
        pl.BlockSpec((rows, 1), lambda i, j, k, b: (i, 0)),
    )
    return arrays, [None if a is None else s for a, s in zip(arrays, specs, strict=True)]


def _call(kernel, ops, tiles, args, in_specs, out_specs, out_shape, parallel_classes, name,
          config):  # fmt: skip
    """pallas_call over the grid (row blocks, class tiles, depth steps), the block index
    prefetched as a scalar (0 when w is the block itself); `kernel` takes its ref first."""
    n, d = ops.x.shape
    rows, classes, depth, _ = tiles
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(pl.cdiv(n, rows), pl.cdiv(_num_classes(ops), classes), pl.cdiv(d, depth)),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((rows, classes), jnp.float32)],
    )
    classes_axis = "parallel" if parallel_classes else "arbitrary"
    block = jnp.zeros((1,), jnp.int32) if ops.block is None else ops.block.reshape(1)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", classes_axis, "arbitrary")
        ),
        interpret=config.interpret,
        name=name,
    )(block.astype(jnp.int32), *args)


def _tiles(config, ops):
    (n, d), v = ops.x.shape, _num_classes(ops)
    return tile_sizes(n, v, d, config, ops.x.dtype.itemsize)


def stats(config, ops, out_shape):
    """The stats kernel on one block (`fused_head.Operands`); `out_shape`: a `StatsOut`
    of (N, 1) types. Returns the `StatsOut` as (1, N) arrays (one segment)."""
    tiles = _tiles(config, ops)
    arrays, in_specs = _specs(ops, tiles)
    column = pl.BlockSpec((tiles[0], 1), lambda i, j, k, b: (i, 0))
    kernel = functools.partial(_stats_kernel, v=_num_classes(ops), d=ops.x.shape[1],
                               chunk=tiles[3], config=config)  # fmt: skip
    out = _call(kernel, ops, tiles, arrays, in_specs, jax.tree.map(lambda _: column, out_shape),
                out_shape, False, "jaxent_fused_head_stats_tpu", config)  # fmt: skip
    return jax.tree.map(lambda a: a.reshape(1, -1), out)


def grad(config, ops, ct):
    """The gradient kernel on one block: (dlogits (N, Bv) in x's dtype, the bias'
    column sums (row blocks, Bv) float32 or None)."""
    (n, d), v = ops.x.shape, _num_classes(ops)
    tiles = _tiles(config, ops)
    arrays, in_specs = _specs(ops, tiles)
    column = pl.BlockSpec((tiles[0], 1), lambda i, j, k, b: (i, 0))
    cts = [None if c is None else c.reshape(-1, 1) for c in ct]
    parts = None
    if ops.bias is not None:  # (row blocks, 1, Bv): a block (1, classes) per (i, j)
        parts = _like(ops.x, (pl.cdiv(n, tiles[0]), 1, v), jnp.float32)
        parts_spec = pl.BlockSpec((None, 1, tiles[1]), lambda i, j, k, b: (i, 0, j))
    kernel = functools.partial(_grad_kernel, n=n, v=v, d=d, chunk=tiles[3], config=config)
    dlogits, parts = _call(
        kernel, ops, tiles, [*arrays, *cts],
        in_specs + [None if c is None else column for c in cts],
        (pl.BlockSpec(tiles[:2], lambda i, j, k, b: (i, j)), None if parts is None else parts_spec),
        (_like(ops.x, (n, v), ops.x.dtype), parts), True, "jaxent_fused_head_grad_tpu", config,
    )  # fmt: skip
    return dlogits, None if parts is None else parts[:, 0, :]
