"""Row statistics of categorical logits in one read: a Pallas kernel (Triton lowering;
`row_stats_tpu.py` is the same computation for Mosaic TPU, chosen by `Config.mosaic`).

`kernel_stats` has the signature and results of `_stable.logit_stats` (integer
labels), `kernel_soft_stats` those of `_stable.soft_stats` (probability targets): this
vocab shard's sums (`Partial` / `SoftPartial`), row max and first argmax. XLA reads
the logits twice (the max, then the sums at that shift); the kernel reads them once,
keeping per row, over tiles of the class axis, the online log-sum-exp of
`linear/lean.py`:

    best <- max(best, max_tile z);  m = safe_shift(best)
    sums <- rescale(sums, m_old, m) + class_sums(z_tile, m)     (soft_sums for targets)

with z = prepare_logits(tile) and the same `_stable` functions as the XLA path, so
the formulas are written once. The label's fields of `Partial` (z[y], its hit flag,
w[y]) are one gathered value per row, taken outside the kernel by
`_stable.logit_label_terms`.

Grid: one program per block of `block_rows` rows; each loops over the classes in
tiles of `block_classes` (powers of two), with masked loads (`other=-inf`: a padding
column is a dropped logit) for a ragged last tile and a ragged last block of rows.
Per logit the forward reads the logit (the target, the mask, when given) once and
writes nothing; per row it writes a few float32 sums.

Backward (`jax.custom_vjp`): `_stable.partial_grad` / `_stable.soft_grad`, the one
elementwise XLA pass of the XLA path: it reads the logits (and targets) once and
writes their gradients once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import _one_read
from .._stable import (
    Partial,
    SoftPartial,
    class_sums,
    forward_logit_stats,
    kept,
    logit_label_terms,
    logit_stats,
    online_add,
    partial_grad,
    prepare_logits,
    safe_shift,
    soft_grad,
    soft_stats,
    soft_sums,
    stacked,
    structure_of,
    unstacked,
)

TILE = 4096  # logits per (rows x classes) tile of one loop step
_BIG = jnp.iinfo(jnp.int32).max


class Config(NamedTuple):
    """Static options of one kernel call (hashable: a `custom_vjp` non-diff argument);
    also those of the fused-head kernels (`fused_head.py`), which add `block_depth`."""

    softcap: float | None
    smoothing: bool
    with_argmax: bool
    interpret: bool
    block_rows: int | None
    block_classes: int | None
    block_depth: int | None = None  # fused head: hidden size per matmul step
    mosaic: bool = False  # the TPU kernel (`row_stats_tpu.py`) instead of Triton's
    xla: bool = False  # no kernel: XLA's one-read variadic reduction (`_one_read.py`)


class Out(NamedTuple):
    """Kernel outputs, (N,) each: the row max, its first column (or None), the sums,
    and for targets with argmax the max of the targets at kept logits and its first
    column (else None)."""

    best: Any
    first: Any
    sums: Any
    target_best: Any
    target_first: Any


def tile_sizes(n: int, c: int, config: Config) -> tuple[int, int]:
    """(block_rows, block_classes): up to TILE logits per loop step, all classes of a
    row in one tile when they fit, several rows per program when rows are short."""
    block_classes = config.block_classes or min(pl.next_power_of_2(c), TILE)
    block_rows = config.block_rows or max(1, min(TILE // block_classes, 64))
    return min(block_rows, pl.next_power_of_2(n)), block_classes


def argmax_step(arg, z, col):
    """Running first argmax over tiles, as XLA's argmax: NaN beats every number, ties
    go to the smaller id. arg = (key: max so far, NaN once a NaN was seen; first)."""
    key, first = arg
    nan = jnp.isnan(z)
    nan_first = jnp.min(jnp.where(nan, col, _BIG), axis=-1)
    clean = jnp.where(nan, -jnp.inf, z)  # Triton's max ignores NaN, XLA's does not
    tile_max = jnp.max(clean, axis=-1)
    max_first = jnp.min(jnp.where(clean == tile_max[:, None], col, _BIG), axis=-1)
    open_ = ~jnp.isnan(key)
    take_nan = open_ & (nan_first < _BIG)
    take_max = open_ & (nan_first == _BIG) & (tile_max > key)
    first = jnp.where(take_nan, nan_first, jnp.where(take_max, max_first, first))
    key = jnp.where(take_nan, jnp.nan, jnp.where(take_max, tile_max, key))
    return key, first


def _kernel(x_ref, t_ref, mask_ref, w_ref, out: Out, *, n, c, block_rows, block_classes,
            config: Config):  # fmt: skip
    """One block of rows. Inputs: (N, C) logits; (N, C) targets, (N, C) mask, (C,)
    float32 weights, each or None. Outputs: `Out` of (N,) refs."""
    r0 = pl.program_id(0) * block_rows
    rows = pl.ds(r0, block_rows)
    row_ok = r0 + lax.iota(jnp.int32, block_rows) < n

    def load(ref, cols, ok, other):
        return None if ref is None else plgpu.load(ref.at[rows, cols], mask=ok, other=other)

    def step(j, carry):
        best, sums, arg, target_arg = carry
        c0 = j.astype(jnp.int32) * block_classes  # int32 ids, also under jax_enable_x64
        col = c0 + lax.iota(jnp.int32, block_classes)
        cols = pl.ds(c0, block_classes)
        ok = row_ok[:, None] & (col < c)[None, :]
        z = prepare_logits(load(x_ref, cols, ok, -jnp.inf), load(mask_ref, cols, ok, False),
                           config.softcap)  # fmt: skip
        w = None if w_ref is None else plgpu.load(w_ref.at[cols], mask=col < c, other=0.0)
        if t_ref is None:
            tile_sums = functools.partial(class_sums, z, w=w, smoothing=config.smoothing)
        else:
            t = load(t_ref, cols, ok, 0.0).astype(z.dtype)
            tile_sums = functools.partial(soft_sums, z, t, w=w, smoothing=config.smoothing)
            if target_arg is not None:
                target_arg = argmax_step(target_arg, jnp.where(kept(z), t, -jnp.inf), col)
        sums, best = online_add(sums, best, jnp.max(z, axis=-1), tile_sums)
        arg = None if arg is None else argmax_step(arg, z, col)
        return best, sums, arg, target_arg

    zeros = jnp.zeros((block_rows,), jnp.float32)
    no_arg = (zeros - jnp.inf, jnp.zeros((block_rows,), jnp.int32))
    init = (
        zeros - jnp.inf,
        jax.tree.map(lambda _: zeros, out.sums),
        None if out.first is None else no_arg,
        None if out.target_first is None else no_arg,
    )
    best, sums, arg, target_arg = lax.fori_loop(0, pl.cdiv(c, block_classes), step, init)
    results = Out(best, None if arg is None else arg[1], sums,
                  *(None, None) if target_arg is None else target_arg)  # fmt: skip
    for ref, value in zip(jax.tree.leaves(out), jax.tree.leaves(results), strict=True):
        plgpu.store(ref.at[rows], value, mask=row_ok)


def _like(x, shape, dtype) -> jax.ShapeDtypeStruct:
    """An output type that varies over the mesh axes `x` varies over: inside
    `shard_map`, pallas_call needs to be told."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _launch(config: Config, x, t, mask, weights) -> Out:
    """The kernel on (N, C) logits; (N, C) targets, (N, C) mask and (C,) float32
    weights, each or None. Sums come back with the label fields of `Partial` None."""
    if config.xla:
        options = dict(softcap=config.softcap, smoothing=config.smoothing)
        return Out(*_one_read.rows(x, t, mask, weights, **options, with_argmax=config.with_argmax))
    n, c = x.shape
    # Mosaic writes (N, 1) columns (`row_stats_tpu`), Triton (N,) rows.
    shape = (n, 1) if config.mosaic else (n,)
    row, ids = _like(x, shape, jnp.float32), _like(x, shape, jnp.int32)
    extra = dict(kw_sum=row, below_max=row, count=row) if config.smoothing else {}
    if t is None:
        sums = Partial(s=row, z_label=None, label_hits=None, **extra)
    else:
        sums = SoftPartial(s=row, wt_sum=row, wt_below=row, lost=row, **extra)
    argmax = config.with_argmax
    out_shape = Out(row, ids if argmax else None, sums,
                    *(row, ids) if argmax and t is not None else (None, None))  # fmt: skip
    if config.mosaic:
        from . import row_stats_tpu

        return row_stats_tpu.call(config, x, t, mask, weights, out_shape)
    block_rows, block_classes = tile_sizes(n, c, config)
    kernel = functools.partial(
        _kernel, n=n, c=c, block_rows=block_rows, block_classes=block_classes, config=config
    )
    num_warps = 4 if block_rows * block_classes < TILE else 8
    return pl.pallas_call(
        lambda *refs: kernel(*refs[:4], Out(*refs[4:])),
        out_shape=out_shape,
        grid=(pl.cdiv(n, block_rows),),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=config.interpret,
        name="jaxent_row_stats",
    )(x, t, mask, weights)


@_launch.defjvp
def _launch_jvp(config: Config, primals, tangents):
    """Forward mode, which second derivatives need (`jax.hessian`, grad of grad: the
    outer derivative runs through the forward rule of the `custom_vjp`s below). The
    kernel's results come from the kernel; the tangents of its sums from XLA, by
    differentiating the same `_stable` formulas at the kernel's shift held fixed — the
    shift is gradient-free, as in the XLA path, because the loss does not depend on it.
    The max and the argmax get no tangent. No tangent flows from the class weights
    (they get no gradient either)."""
    x, t, mask, weights = primals
    out = _launch(config, *primals)
    m = safe_shift(out.best)

    def sums(x, t):
        z = prepare_logits(x, mask, config.softcap)
        if t is None:
            return class_sums(z, m, weights, config.smoothing)
        return soft_sums(z, t.astype(z.dtype), m, weights, config.smoothing)

    d_sums = jax.jvp(sums, (x, t), tuple(tangents[:2]))[1]
    zero = jax.tree.map(_zero_tangent, out)
    return out, zero._replace(sums=d_sums)


def _zero_tangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)  # integer outputs: the argmax columns


def _rows(config: Config, logits, targets, class_weights, logit_mask, offset) -> Out:
    """`_launch` on any leading shape; results in that shape, argmax ids global."""
    lead, c = logits.shape[:-1], logits.shape[-1]
    n = math.prod(lead)

    def flat(a):
        return None if a is None else jnp.broadcast_to(a, logits.shape).reshape(n, c)

    weights = None if class_weights is None else class_weights.astype(jnp.float32)
    out = _launch(config, flat(logits), flat(targets), flat(logit_mask), weights)
    out = jax.tree.map(lambda a: a.reshape(lead), out)
    # Triton's max skips NaN; a NaN among the kept logits always reaches s, so the
    # max is NaN exactly where XLA's is (and for a +inf logit, where s is NaN too).
    best = jnp.where(jnp.isnan(out.sums.s), jnp.nan, out.best)
    first, target_first = (None if a is None else a + offset for a in (out.first, out.target_first))
    return out._replace(best=best, first=first, target_first=target_first)


# Integer labels.


def _forward(config: Config, logits, labels, offset, class_weights, logit_mask):
    out = _rows(config, logits, None, class_weights, logit_mask, offset)
    mask = None if logit_mask is None else jnp.broadcast_to(logit_mask, logits.shape)
    labelled = logit_label_terms(logits, labels, offset, class_weights, mask, config.softcap)
    return out.sums._replace(**labelled), out.best, out.first


# The custom_vjps return their sums `stacked` (one array), so that `jax.vmap` batches
# them together: see `_stable.stacked`.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stats(config: Config, fields, *args):
    partial, best, first = _forward(config, *args)
    return stacked(partial), best, first


def _stats_fwd(config: Config, fields, logits, labels, offset, class_weights, logit_mask):
    partial, best, first = _forward(config, logits, labels, offset, class_weights, logit_mask)
    hit = partial.label_hits > 0
    residuals = (logits, labels, offset, safe_shift(best), class_weights, logit_mask, hit)
    return (stacked(partial), best, first), residuals


def _stats_bwd(config: Config, fields, residuals, cotangents):
    logits, labels, offset, m, class_weights, logit_mask, hit = residuals
    ct = unstacked(fields, cotangents[0])  # best, first: gradient-free (shift, argmax)
    grad = partial_grad(ct, logits, labels, offset, m, class_weights, logit_mask, hit,
                        config.softcap, config.smoothing, None)  # fmt: skip
    return grad, None, None, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def kernel_stats(logits, labels, offset, class_weights, logit_mask, *, softcap, smoothing,
                 with_argmax, interpret=False, block_rows=None, block_classes=None,
                 mosaic=False, xla=False):  # fmt: skip
    """`_stable.logit_stats` with the forward in one Pallas kernel; same shapes and
    results. `interpret` runs the kernel in the Pallas interpreter (any backend);
    `block_rows` / `block_classes` (powers of two) override `tile_sizes`; `mosaic`
    takes the TPU kernel (`row_stats_tpu`) instead of the Triton one, `xla` no kernel
    but XLA's one-read reduction (`_one_read`)."""
    config = Config(softcap, smoothing, with_argmax, interpret, block_rows, block_classes,
                    mosaic=mosaic, xla=xla)  # fmt: skip
    args = (logits, labels, offset, class_weights, logit_mask)
    fields = structure_of(lambda *a: _forward(config, *a)[0], *args)
    partial, best, first = _stats(config, fields, *args)
    return unstacked(fields, partial), best, first


def forward_stats(logits, labels, offset, class_weights, logit_mask, *, softcap, smoothing,
                  with_argmax, interpret=False, block_rows=None, block_classes=None,
                  mosaic=False, xla=False):  # fmt: skip
    """`kernel_stats` without its `custom_vjp`: the same results, differentiable in
    forward mode too (through `_launch`'s rule; reverse mode transposes it). For a
    forward pass inside another `custom_vjp`'s forward rule (`linear.chunked`'s
    recompute scheme, `linear.lean`): never differentiated in reverse mode at first
    order, in forward mode when second derivatives are taken."""
    config = Config(softcap, smoothing, with_argmax, interpret, block_rows, block_classes,
                    mosaic=mosaic, xla=xla)  # fmt: skip
    return _forward(config, logits, labels, offset, class_weights, logit_mask)


# Probability targets.


def _soft_forward(config: Config, logits, targets, offset, class_weights, logit_mask):
    out = _rows(config, logits, targets, class_weights, logit_mask, offset)
    return out.sums, out.best, out.first, out.target_best, out.target_first


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _soft_stats(config: Config, fields, *args):
    sums, *rest = _soft_forward(config, *args)
    return stacked(sums), *rest


def _soft_stats_fwd(config: Config, fields, logits, targets, offset, class_weights, logit_mask):
    sums, *rest = _soft_forward(config, logits, targets, offset, class_weights, logit_mask)
    residuals = (logits, targets, safe_shift(rest[0]), class_weights, logit_mask)
    return (stacked(sums), *rest), residuals


def _soft_stats_bwd(config: Config, fields, residuals, cotangents):
    logits, targets, m, class_weights, logit_mask = residuals
    grads = soft_grad(unstacked(fields, cotangents[0]), logits, targets, m, class_weights,
                      logit_mask, config.softcap, config.smoothing, None)  # fmt: skip
    return *grads, None, None, None


_soft_stats.defvjp(_soft_stats_fwd, _soft_stats_bwd)


def kernel_soft_stats(logits, targets, offset, class_weights, logit_mask, *, softcap,
                      smoothing, with_argmax, interpret=False, block_rows=None,
                      block_classes=None, mosaic=False, xla=False):  # fmt: skip
    """`_stable.soft_stats` with the forward in one Pallas kernel (reads the logits and
    the targets once); options as in `kernel_stats`."""
    config = Config(softcap, smoothing, with_argmax, interpret, block_rows, block_classes,
                    mosaic=mosaic, xla=xla)  # fmt: skip
    args = (logits, targets, offset, class_weights, logit_mask)
    fields = structure_of(lambda *a: _soft_forward(config, *a)[0], *args)
    sums, *rest = _soft_stats(config, fields, *args)
    return unstacked(fields, sums), *rest


def on_cuda(kernel_fn, xla_fn, kernel: bool = True):
    """`kernel_fn` where the computation is lowered for CUDA, `xla_fn` (two reads of the
    logits) on CPU, and `kernel_fn` with `xla=True` (XLA's one-read reduction, through
    the kernel's custom derivatives) on every other platform — and on CUDA too when not
    `kernel`; chosen at lowering, so one traced function serves all. Each takes the
    positional arguments of the stats functions above and their keyword options."""

    def run(*args, softcap, smoothing, with_argmax, **kernel_options):
        options = dict(softcap=softcap, smoothing=smoothing, with_argmax=with_argmax)
        one_read = functools.partial(kernel_fn, **options, xla=True)
        return lax.platform_dependent(
            *args,
            cuda=functools.partial(kernel_fn, **options, **kernel_options) if kernel else one_read,
            cpu=functools.partial(xla_fn, **options),
            default=one_read,
        )

    return run


platform_stats = on_cuda(kernel_stats, logit_stats)
platform_soft_stats = on_cuda(kernel_soft_stats, soft_stats)
# For calls XLA partitions over devices (`jaxent.pallas.stats_for`): no Pallas call.
partitioned_stats = on_cuda(kernel_stats, logit_stats, kernel=False)
partitioned_soft_stats = on_cuda(kernel_soft_stats, soft_stats, kernel=False)
# Forward passes alone (`forward_stats`); on CPU the two reads without a custom backward.
platform_forward_stats = on_cuda(forward_stats, forward_logit_stats)
partitioned_forward_stats = on_cuda(forward_stats, forward_logit_stats, kernel=False)
