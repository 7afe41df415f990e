"""The output projection fused with the loss: Pallas kernels (Triton lowering) that
form the logits x @ w.T + b tile by tile on chip, for `linear_cross_entropy(...,
implementation="pallas")`. `fused_head_tpu.py` is the same two kernels for TPUs
(Mosaic), taken with `Config.mosaic`; the wrappers, combination and derivatives here
serve both.

They run inside the scheme of `jaxent/linear/lean.py` (blocks of Bv classes, an
online log-sum-exp over the blocks in the forward pass, a recompute in the backward
pass) and replace, per block, the two steps that XLA takes through memory:

- `block_stats`, forward: XLA writes the block's (N, Bv) float32 logits, then reads
  them back for the row max and again for the sums. The kernel computes each (rows x
  classes) tile of logits with a loop of `dot`s over the hidden size, keeps the
  online log-sum-exp of its rows (`_stable.online_add`, `class_sums`: the formulas of
  every other path) and writes only the per-row sums: nothing (N, Bv)-sized.
- `block_grad`, backward: XLA writes the float32 logits, reads them for the gradient
  (`_stable.partial_grad`) and writes that; the kernel recomputes each tile and writes
  its gradient once, in the matmul dtype, ready for the dx and dw matmuls (XLA's:
  cuBLAS), with the bias gradient's column sums.

Per logit the memory traffic around the matmuls drops from 26 bytes (XLA's lean:
float32 logits written in each pass and read back, twice in the forward; the bf16
gradient written once and read by the dx and dw matmuls) to those last 6 (compiled for
an H100, bf16 Llama-3 and Gemma-2 heads: `python -m benchmarks.deviceless`,
`hlo.loop_passes`); what remains is four matmuls (the logits twice), as the README's
"Fast or lean, not both" explains.

float32 inputs take IEEE float32 products (`Precision.HIGHEST`: CUDA cores, several
times slower than tensor cores); bfloat16 inputs, the target, take bf16 products with
float32 accumulation.

Tiles: block_rows x block_classes logits per program, the hidden size in steps of
block_depth; all powers of two and at least 16 (Triton's smallest dot). Ragged N, Bv
and D are masked loads (padding is 0, then dropped), never padded copies.

Derivatives: each kernel is a `jax.custom_jvp` whose tangents come from its XLA twin
(`_stats_xla`, `_grad_xla`: the same formulas on materialised logits), so second
derivatives work as on the XLA paths; the twins run only under forward-mode
differentiation.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .._stable import (
    Partial,
    block_partial,
    class_sums,
    merge_first,
    online_add,
    partial_grad,
    prepare_logits,
    rescale,
    safe_shift,
    tile_label_terms,
)
from ..linear.blocks import take_block
from ..linear.mesh import varying_like
from ..linear.reference import gradient_dtype, project
from .row_stats import Config, _like, argmax_step

MIN_TILE = 16  # Triton's dot needs every side >= 16
# (rows, classes, depth) per tile: a common Triton matmul tile for Hopper, unmeasured
# here; `python -m benchmarks.sweep pallas` on a GPU tunes it (`jaxent.pallas.tiles`).
DEFAULT_TILES = (64, 128, 64)


def tile_sizes(n: int, v: int, d: int, config: Config) -> tuple[int, int, int]:
    """(block_rows, block_classes, block_depth): 64 x 128 logits per tile, the hidden
    size 64 at a time, no larger than the operands need, none below MIN_TILE."""

    def size(override, default, extent):
        return max(MIN_TILE, override or min(default, pl.next_power_of_2(max(extent, 1))))

    rows, classes, depth = DEFAULT_TILES
    return (
        size(config.block_rows, rows, n),
        size(config.block_classes, classes, v),
        size(config.block_depth, depth, d),
    )


class Operands(NamedTuple):
    """One block of classes: x (N, D); w (Bv, D) in x's dtype; bias, class_weights (Bv,)
    float32 or None; class_mask (Bv,) bool (False: padding); logit_mask (N, Bv) bool or
    None; labels (N,) int32, local to the block (outside [0, Bv): not in it).

    block: None, or (the TPU kernels) an int32 scalar with w lean's whole grouped view
    (Bv / g, nb, g, D) of which this is block `block`: the kernel reads its tiles where
    they lie, where slicing the block out would make XLA:TPU re-lay out all of w
    (compiled for a v5p, Llama-3 head: a 1 GiB copy). `block_w` is the (Bv, D) block."""

    x: Any
    w: Any
    bias: Any
    class_weights: Any
    class_mask: Any
    logit_mask: Any
    labels: Any
    block: Any = None

    def arrays(self) -> tuple:
        """The operands the Triton kernels take (w a (Bv, D) block)."""
        assert self.block is None, "the Triton kernels take w as a (Bv, D) block"
        return tuple(self)[:7]


def block_w(ops: Operands):
    """The block's (Bv, D) rows of w."""
    return ops.w if ops.block is None else take_block(ops.w, ops.block, group=ops.w.shape[2])


class _Tile(NamedTuple):
    rows: Any  # pl.ds of the rows
    cols: Any  # pl.ds of the classes
    row_ok: Any  # (BN,) bool
    col: Any  # (BV,) int32 block-local class ids
    col_ok: Any  # (BV,) bool


def _tile(r0, c0, n, v, bn, bv) -> _Tile:
    col = c0 + lax.iota(jnp.int32, bv)
    return _Tile(pl.ds(r0, bn), pl.ds(c0, bv), r0 + lax.iota(jnp.int32, bn) < n, col, col < v)


def _logits_and_keep(refs: Operands, t: _Tile, d: int, bd: int):
    """(z, keep): the tile's float32 logits x @ w.T + b (the depth loop of `dot`s) and
    which of them are kept (real rows and classes, class mask, logit mask)."""
    bn, bv = t.row_ok.shape[0], t.col.shape[0]
    # float32 inputs: full float32 products (Triton's default would round them to TF32).
    precision = lax.Precision.HIGHEST if refs.x.dtype == jnp.float32 else None

    def depth_step(k, acc):
        d0 = k * bd
        d_ok = (d0 + lax.iota(jnp.int32, bd) < d)[None, :]
        xk = plgpu.load(refs.x.at[t.rows, pl.ds(d0, bd)], mask=t.row_ok[:, None] & d_ok, other=0)
        wk = plgpu.load(refs.w.at[t.cols, pl.ds(d0, bd)], mask=t.col_ok[:, None] & d_ok, other=0)
        return acc + plgpu.dot(xk, wk, trans_b=True, precision=precision)

    z = lax.fori_loop(0, pl.cdiv(d, bd), depth_step, jnp.zeros((bn, bv), jnp.float32))
    if refs.bias is not None:
        z = z + plgpu.load(refs.bias.at[t.cols], mask=t.col_ok, other=0.0)[None, :]
    class_ok = t.col_ok & plgpu.load(refs.class_mask.at[t.cols], mask=t.col_ok, other=False)
    keep = t.row_ok[:, None] & class_ok[None, :]
    if refs.logit_mask is not None:
        lm = plgpu.load(refs.logit_mask.at[t.rows, t.cols], mask=keep, other=False)
        keep = keep & lm
    return z, keep


def _class_weights(refs: Operands, t: _Tile):
    if refs.class_weights is None:
        return None
    return plgpu.load(refs.class_weights.at[t.cols], mask=t.col_ok, other=0.0)


class StatsOut(NamedTuple):
    """(N,) each: the row max of the block's prepared logits, its first block-local
    column (or None), and the block's `Partial` taken at shift safe_shift(best). The
    kernel writes them (S, N), one row per segment of the classes, with `key`: the
    argmax's running key (the max, NaN once a NaN was seen; None without argmax)."""

    best: Any
    first: Any
    sums: Partial
    key: Any = None


# Programs the forward kernel aims for (about two per SM of an H100/H200): when the
# blocks of rows alone are fewer, the block's classes are split into segments.
TARGET_PROGRAMS = 256


def segments(n: int, v: int, tiles) -> tuple[int, int]:
    """(segments S, class tiles per segment) of the forward kernel's grid (rows, S)."""
    bn, bv, _ = tiles
    n_tiles = pl.cdiv(v, bv)
    wanted = min(n_tiles, max(1, pl.cdiv(TARGET_PROGRAMS, max(pl.cdiv(n, bn), 1))))
    per = pl.cdiv(n_tiles, wanted)
    return pl.cdiv(n_tiles, per), per


def _stats_kernel(*refs, n, v, d, tiles, per, config: Config):
    """One block of rows and one segment of `per` class tiles (a tile past the last
    class is all padding: dropped)."""
    ins, out = Operands(*refs[:7]), StatsOut(*refs[7:])
    bn, bv, bd = tiles
    r0, seg = pl.program_id(0) * bn, pl.program_id(1)
    row_ok = r0 + lax.iota(jnp.int32, bn) < n
    labels = plgpu.load(ins.labels.at[pl.ds(r0, bn)], mask=row_ok, other=-1)

    def step(j, carry):
        best, sums, arg = carry
        t = _tile(r0, (seg * per + j.astype(jnp.int32)) * bv, n, v, bn, bv)
        z, keep = _logits_and_keep(ins, t, d, bd)
        z = prepare_logits(z, keep, config.softcap)
        cw = _class_weights(ins, t)
        # The label's logit and weight: one compare per logit, on chip.
        labelled = tile_label_terms(z, t.col[None, :], labels, t.col_ok[None, :],
                                    None if cw is None else cw[None, :])  # fmt: skip

        def tile_sums(m):
            return class_sums(z, m, cw, config.smoothing)._replace(**labelled)

        sums, best = online_add(sums, best, jnp.max(z, axis=-1), tile_sums)
        arg = None if arg is None else argmax_step(arg, z, t.col)
        return best, sums, arg

    zeros = jnp.zeros((bn,), jnp.float32)
    sums = jax.tree.map(lambda _: zeros, out.sums)
    arg = (zeros - jnp.inf, jnp.zeros((bn,), jnp.int32)) if config.with_argmax else None
    best, sums, arg = lax.fori_loop(0, per, step, (zeros - jnp.inf, sums, arg))
    results = StatsOut(best, None, sums) if arg is None else StatsOut(best, arg[1], sums, arg[0])
    for ref, value in zip(jax.tree.leaves(out), jax.tree.leaves(results), strict=True):
        plgpu.store(ref.at[pl.ds(seg, 1), pl.ds(r0, bn)], value[None, :], mask=row_ok[None, :])


def _num_warps(bn: int, bv: int) -> int:
    return 4 if bn * bv <= 64 * 64 else 8


def _combined(out: StatsOut) -> StatsOut:
    """The (S, N) results of the segments as one (N,) result: the online log-sum-exp
    step of "lean"'s blocks (`online_add`, `merge_first`) over the segments, in order.

    With the argmax, the max compared is its key (NaN once a NaN was seen, +inf
    included), as XLA's max; without it, the kernel's (Triton's max skips NaN), made
    NaN where s is (a NaN, or a +inf, among the kept logits always reaches s)."""
    key = out.best if out.key is None else out.key

    def step(carry, segment):
        total, best, first = carry
        seg_best, seg_key, seg_first, seg_sums = segment
        if first is not None:  # later segments hold larger ids
            first = merge_first(best, first, seg_key, seg_first, False)
        own = safe_shift(seg_best)  # the shift the kernel took the sums at
        total, best = online_add(total, best, seg_key, lambda m: rescale(seg_sums, own, m))
        return (total, best, first), None

    # Inside shard_map the kernels' outputs vary like x: so must the scan's carry.
    row = varying_like(jnp.zeros(out.best.shape[1:], jnp.float32), [out.best])
    init = (jax.tree.map(lambda _: row, out.sums), row - jnp.inf,
            None if out.first is None else jnp.zeros_like(row, jnp.int32))  # fmt: skip
    (sums, best, first), _ = lax.scan(step, init, (out.best, key, out.first, out.sums))
    if out.key is None:
        best = jnp.where(jnp.isnan(sums.s), jnp.nan, best)
    return StatsOut(best, first, sums)


def _stats_launch(config: Config, ops: Operands) -> StatsOut:
    n, d = ops.x.shape
    v = ops.class_mask.shape[0]
    if config.mosaic:  # (N, 1) columns, one segment (`fused_head_tpu`)
        shape = (n, 1)
    else:  # (S, N) rows: S segments of the classes
        tiles = tile_sizes(n, v, d, config)
        num_segments, per = segments(n, v, tiles)
        shape = (num_segments, n)
    seg = _like(ops.x, shape, jnp.float32)
    extra = dict(kw_sum=seg, below_max=seg, count=seg) if config.smoothing else {}
    w_label = seg if ops.class_weights is not None else None
    sums = Partial(s=seg, z_label=seg, label_hits=seg, w_label=w_label, **extra)
    argmax = config.with_argmax
    out_shape = StatsOut(seg, _like(ops.x, shape, jnp.int32) if argmax else None,
                         sums, seg if argmax else None)  # fmt: skip
    if n == 0:  # no program to run (a grid of size 0): one segment of no rows
        return _combined(jax.tree.map(lambda a: jnp.zeros((1, 0), a.dtype), out_shape))
    if config.mosaic:
        from . import fused_head_tpu

        return _combined(fused_head_tpu.stats(config, ops, out_shape))
    kernel = functools.partial(_stats_kernel, n=n, v=v, d=d, tiles=tiles, per=per, config=config)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, tiles[0]), num_segments),
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(*tiles[:2]), num_stages=3),
        interpret=config.interpret,
        name="jaxent_fused_head_stats",
    )(*ops.arrays())
    return _combined(out)


def _kept_xla(ops: Operands):
    """(N, Bv) bool: the kept logits of the XLA twins (class mask, logit mask)."""
    keep = jnp.broadcast_to(ops.class_mask, (ops.x.shape[0], ops.class_mask.shape[0]))
    return keep if ops.logit_mask is None else keep & ops.logit_mask


def _stats_xla(config: Config, ops: Operands, m):
    """The block's `Partial` at shift m from materialised logits: the kernel's sums as a
    differentiable XLA function (its tangents)."""
    z = prepare_logits(project(ops.x, block_w(ops), ops.bias), _kept_xla(ops), config.softcap)
    return block_partial(z, ops.labels, 0, m, ops.class_weights, config.smoothing)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _stats(config: Config, ops: Operands) -> StatsOut:
    return _stats_launch(config, ops)


@_stats.defjvp
def _stats_jvp(config: Config, primals, tangents):
    """Tangents of the sums from XLA at the kernel's shift held fixed (it is
    gradient-free); the max and its column get none; class weights, masks and labels
    carry no derivative."""
    (ops,), (dops,) = primals, tangents
    out = _stats(config, ops)
    m = safe_shift(out.best)

    def sums(x, w, bias):
        return _stats_xla(config, ops._replace(x=x, w=w, bias=bias), m)

    d_sums = jax.jvp(sums, (ops.x, ops.w, ops.bias), (dops.x, dops.w, dops.bias))[1]
    first = None if out.first is None else np.zeros(out.first.shape, jax.dtypes.float0)
    return out, StatsOut(jnp.zeros_like(out.best), first, d_sums)


def block_stats(config: Config, ops: Operands) -> StatsOut:
    """The block's row statistics in one kernel: (best, first, Partial at
    safe_shift(best)); first is block-local. Shapes as in `Operands`."""
    return _stats(config, ops)


class Cotangents(NamedTuple):
    """(N,) float32 cotangents of the whole-row sums the logits' gradient depends on,
    and the shift the sums were taken with: s, z_label, below_max (None without
    smoothing), m."""

    s: Any
    z_label: Any
    below_max: Any
    m: Any


def _grad_kernel(*refs, n, v, d, tiles, config: Config):
    """One (rows x classes) tile: recompute its logits, write their gradient (and the
    tile's column sums of it, for the bias)."""
    ins, ct_refs = Operands(*refs[:7]), Cotangents(*refs[7:11])
    dlogits_ref, dbias_ref = refs[11:]
    bn, bv, bd = tiles
    c0 = pl.program_id(1) * bv
    t = _tile(pl.program_id(0) * bn, c0, n, v, bn, bv)
    z, keep = _logits_and_keep(ins, t, d, bd)

    def row(ref, other=0.0):
        return None if ref is None else plgpu.load(ref.at[t.rows], mask=t.row_ok, other=other)

    ct = Partial(s=row(ct_refs.s), z_label=row(ct_refs.z_label), label_hits=None,
                 below_max=row(ct_refs.below_max))  # fmt: skip
    # `hit` may be True on every row: a dropped label logit is zeroed by `keep`.
    dz = partial_grad(ct, z, row(ins.labels, -1), c0, row(ct_refs.m), _class_weights(ins, t),
                      keep, t.row_ok, config.softcap, config.smoothing, None)  # fmt: skip
    ok = t.row_ok[:, None] & t.col_ok[None, :]
    plgpu.store(dlogits_ref.at[t.rows, t.cols], dz.astype(dlogits_ref.dtype), mask=ok)
    if dbias_ref is not None:
        part = jnp.sum(dz, axis=0)[None, :]
        plgpu.store(dbias_ref.at[pl.ds(pl.program_id(0), 1), t.cols], part,
                    mask=t.col_ok[None, :])  # fmt: skip


def _grad_launch(config: Config, ops: Operands, ct: Cotangents):
    n, d = ops.x.shape
    v = ops.class_mask.shape[0]
    tiles = tile_sizes(n, v, d, config)
    grid = (pl.cdiv(n, tiles[0]), pl.cdiv(v, tiles[1]))
    parts = None if ops.bias is None else _like(ops.x, (grid[0], v), jnp.float32)
    if n == 0:  # no program to run
        empty = (_like(ops.x, (0, v), gradient_dtype(ops.x.dtype)), parts)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), empty)
    if config.mosaic:
        from . import fused_head_tpu

        return fused_head_tpu.grad(config, ops, ct)
    kernel = functools.partial(_grad_kernel, n=n, v=v, d=d, tiles=tiles, config=config)
    return pl.pallas_call(
        kernel,
        out_shape=(_like(ops.x, (n, v), gradient_dtype(ops.x.dtype)), parts),
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(*tiles[:2]), num_stages=3),
        interpret=config.interpret,
        name="jaxent_fused_head_grad",
    )(*ops.arrays(), *ct)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _grad(config: Config, ops: Operands, ct: Cotangents):
    dlogits, parts = _grad_launch(config, ops, ct)
    return dlogits, None if parts is None else jnp.sum(parts, axis=0)


def _grad_xla(config: Config, ops: Operands, ct: Cotangents):
    """`_grad` from materialised logits (its tangents)."""
    keep = _kept_xla(ops)
    sums = Partial(s=ct.s, z_label=ct.z_label, label_hits=None, below_max=ct.below_max)
    hit = jnp.ones(ops.labels.shape, bool)
    z = project(ops.x, block_w(ops), ops.bias)
    dz = partial_grad(sums, z, ops.labels, 0, ct.m, ops.class_weights, keep, hit,
                      config.softcap, config.smoothing, None)  # fmt: skip
    return dz.astype(gradient_dtype(ops.x.dtype)), None if ops.bias is None else jnp.sum(dz, axis=0)


@_grad.defjvp
def _grad_jvp(config: Config, primals, tangents):
    """Tangents from XLA in x, w, bias and the cotangents (which depend on the inputs
    under second derivatives); the shift m is gradient-free."""
    (ops, ct), (dops, dct) = primals, tangents

    def grad(x, w, bias, s, z_label, below_max):
        return _grad_xla(config, ops._replace(x=x, w=w, bias=bias),
                         Cotangents(s, z_label, below_max, ct.m))  # fmt: skip

    args = (ops.x, ops.w, ops.bias, ct.s, ct.z_label, ct.below_max)
    dargs = (dops.x, dops.w, dops.bias, dct.s, dct.z_label, dct.below_max)
    return _grad(config, ops, ct), jax.jvp(grad, args, dargs)[1]


def block_grad(config: Config, ops: Operands, ct: Cotangents):
    """(dlogits (N, Bv) in `reference.gradient_dtype` of x's dtype, dbias (Bv,) float32
    or None) of one block."""
    return _grad(config, ops, ct)
