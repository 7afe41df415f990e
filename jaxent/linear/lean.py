"""Memory-lean `linear_cross_entropy` over blocks of the vocabulary.

The V classes are cut into nb blocks of Bv (padded, which copies `w`, only when Bv
does not divide V; padding classes are dropped logits). Forward: one pass over the
blocks with an online log-sum-exp (`_stable.online_add`) — each block's (N, Bv)
logits update the running row max and the additive sums of `_stable.Partial`
(rescaled when the max grows), exactly the statistics `cross_entropy` uses, taken
from the block as `cross_entropy` takes them on the backend (`_row_stats`: in one read
on a GPU or TPU, two on a CPU). Backward:
a second pass recomputes each block's logits and gets their gradient from the same
`_stable.finish_rows`, by perturbing the saved whole-row sums with the block's own
sums (value unchanged, derivative that of the block); dx accumulates in float32
(N x D) and each block's dw is written directly in w's dtype.

Block i holds the strided classes i, i + nb, i + 2 nb, ...: when `w`'s rows are split
over devices (`jax.jit` with a `NamedSharding` on V), every block is split the same
way and each device works on its own rows, where contiguous blocks would each live on
one device and make XLA all-gather `w`. Labels are mapped to "block-ordered" ids
(`block_order`: block i covers i Bv .. i Bv + Bv - 1), so the shared helpers of
`_stable` still see contiguous ids. On a TPU the strides are runs of 8 classes
(`Static.group`, `api.vocab_group`), so that blocks are made of whole (8, 128) tiles.

Memory: one (N, Bv) block of float32 logits and its gradient, plus the dx
accumulator — no (V, D) float32 copy of w. Cost: 4 matmuls (the logits twice).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._stable import (
    Partial,
    Rows,
    block_partial,
    class_offset,
    combine_shards,
    finish_rows,
    is_off,
    logit_partial,
    merge_first,
    num_classes_global,
    online_add,
    rescale,
    safe_shift,
)
from ..pallas import stats_for
from .blocks import put_block, take_block
from .chunked import Static, pick
from .mesh import sum_to_primal_axes, varying_like
from .reference import gradient_dtype, logits_dtype, project


class Operands(NamedTuple):
    """Arrays of one call, classes cut into nb strided blocks of Bv
    (`blocks.strided_blocks`): x (N, D); w (Bv, nb, D); bias, class_weights (Bv, nb) or
    None; class_mask (Bv, nb) — False on padding; labels (N,) block-ordered ids
    (`block_order`); position_mask (N,); logit_mask (N, Bv, nb) or None; ls, zl as in
    chunked. With `Static.group` g > 1 each Bv axis is (Bv / g, nb, g) instead."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None
    class_weights: jax.Array | None
    class_mask: jax.Array
    labels: jax.Array
    position_mask: jax.Array
    logit_mask: jax.Array | None
    ls: jax.Array | None
    zl: jax.Array | None


def block_order(
    labels: jax.Array, vocab: int, num_blocks: int, block: int, group: int = 1
) -> jax.Array:
    """Global class ids -> block-ordered ids. With V local classes per vocabulary shard,
    class c is local class c % V of shard c // V; in runs of g (`group`), its run
    q, k = divmod(c % V, g) sits at [j, i] = divmod(q, nb) of its shard's blocks, so
    its block-ordered id is (c // V) nb Bv + i Bv + j g + k. Ids outside [0, V * shards)
    stay outside [0, nb Bv * shards), so they still give NaN."""
    shard, local = jnp.divmod(labels, vocab)
    run, k = jnp.divmod(local, group)
    j, i = jnp.divmod(run, num_blocks)
    return shard * (num_blocks * block) + i * block + j * group + k


def _block_size(st: Static, ops: Operands) -> int:
    return ops.w.shape[0] * st.group


def _local_classes(st: Static, ops: Operands) -> int:
    """Classes of this shard's blocks, padding included."""
    return _block_size(st, ops) * _num_blocks(ops)


def _block(st: Static, ops: Operands, i):
    """Block i: its first block-ordered id and its slices of the per-class operands."""

    def take(a, axis=1):
        return take_block(a, i, axis, st.group)

    return (
        i * _block_size(st, ops),
        take(ops.w),
        take(ops.bias),
        take(ops.class_weights),
        take(ops.class_mask),
        take(ops.logit_mask, axis=2),
    )


def _class_id(st: Static, ops: Operands, ordered):
    """This shard's class id of a block-ordered id (`block_order` without the shard)."""
    block, num_blocks = _block_size(st, ops), _num_blocks(ops)
    i, in_block = jnp.divmod(ordered % (block * num_blocks), block)
    j, k = jnp.divmod(in_block, st.group)
    return (j * num_blocks + i) * st.group + k


def _num_blocks(ops: Operands) -> int:
    return ops.w.shape[1]


def _mask_and_offset(st: Static, ops: Operands, logits, offset, mb, lmb):
    """The (N, Bv) logit mask of one block (False on padding and masked classes; None
    when every class is kept, so that a kernel reads no mask) and the global id of its
    first class."""
    offset = offset + class_offset(_local_classes(st, ops), st.vocab_axis_name)
    if not st.padded:
        return lmb, offset
    mask = jnp.broadcast_to(mb, logits.shape)
    return mask if lmb is None else mask & lmb, offset


def _smoothing(st: Static, ops: Operands) -> bool:
    return not is_off(pick(st.label_smoothing, ops.ls))


def _finish(st: Static, ops: Operands, total: Partial, best, first) -> Rows:
    return finish_rows(
        total,
        best,
        first,
        ops.labels,
        num_classes_global(_local_classes(st, ops), st.vocab_axis_name),
        position_mask=ops.position_mask,
        ignore_index=st.ignore_index,
        label_smoothing=pick(st.label_smoothing, ops.ls),
        z_loss=pick(st.z_loss, ops.zl),
    )


def _kernel_operands(st: Static, ops: Operands, i):
    """(`fused_head.Operands` of block i, the block's first block-ordered id): labels
    local to the block, per-class operands in float32, w in x's dtype. ("pallas" has
    no vocabulary shards, so the id needs no shard offset.)"""
    from ..pallas import fused_head

    offset, wb, bb, cwb, mb, lmb = _block(st, ops, i)
    mm = jnp.result_type(ops.x.dtype, ops.w.dtype)
    bias = None if bb is None else bb.astype(jnp.float32)
    weights = None if cwb is None else cwb.astype(jnp.float32)
    labels = ops.labels - offset  # a label outside [0, Bv) is not in the block
    block = fused_head.Operands(ops.x.astype(mm), wb.astype(mm), bias, weights, mb, lmb, labels)
    # The TPU kernels read the block from w itself (`fused_head.Operands.block`), unless
    # w must first be cast to the matmul dtype: that is done a block at a time.
    if st.fused.mosaic and st.group > 1 and ops.w.dtype == mm:
        block = block._replace(w=ops.w, block=i)
    return block, offset


def _kernel_stats(st: Static, ops: Operands, i):
    """(block_best, block_first, block_sums(m)) of block i from the stats kernel: its
    sums come at the block's own shift and are moved to the running one."""
    from ..pallas import fused_head

    block, offset = _kernel_operands(st, ops, i)
    config = st.fused._replace(smoothing=_smoothing(st, ops), with_argmax=st.with_argmax)
    out = fused_head.block_stats(config, block)
    own = safe_shift(out.best)
    first = None if out.first is None else out.first + offset

    def block_sums(m):
        return rescale(out.sums, own, m)

    return out.best, first, block_sums


def _kernel_grad(st: Static, ops: Operands, i, ct_sums: Partial, m):
    """(dlogits in the matmul dtype, dbias float32 or None) of block i from the
    gradient kernel."""
    from ..pallas import fused_head

    config = st.fused._replace(smoothing=_smoothing(st, ops), with_argmax=False)
    ct = fused_head.Cotangents(ct_sums.s, ct_sums.z_label, ct_sums.below_max, m)
    return fused_head.block_grad(config, _kernel_operands(st, ops, i)[0], ct)


def _row_stats(st: Static, ops: Operands, i):
    """(block_best, block_first, block_sums(m)) of block i from its logits, with the row
    statistics `cross_entropy` takes on the backend (`jaxent.pallas.stats_for`: on a
    GPU the one-read kernel, on a TPU XLA's one-read reduction, on a CPU two reads;
    `api._lean` leaves `row_kernel` None where XLA partitions the call). They come at
    the block's own shift and are moved to the running one."""
    offset, wb, bb, cwb, mb, lmb = _block(st, ops, i)
    logits = project(ops.x, wb, bb)
    mask, offset = _mask_and_offset(st, ops, logits, offset, mb, lmb)
    stats = stats_for(st.row_kernel, forward=True)
    sums, best, first = stats(
        logits, ops.labels, offset, cwb, mask,
        softcap=st.softcap, smoothing=_smoothing(st, ops), with_argmax=st.with_argmax,
    )  # fmt: skip

    def block_sums(m):
        return rescale(sums, safe_shift(best), m)

    return best, first, block_sums


def _statistics(st: Static, ops: Operands):
    """One pass over the vocabulary blocks: whole-row (Partial, best, first)."""
    n = ops.x.shape[0]
    dtype = logits_dtype(ops.x, ops.w)  # the logits' (`project`)

    def step(carry, i):
        total, best, first = carry
        if st.fused is None:
            block_best, block_first, block_sums = _row_stats(st, ops, i)
        else:
            block_best, block_first, block_sums = _kernel_stats(st, ops, i)
        if first is not None:
            # Blocks are strided: block order is not class order.
            smaller = _class_id(st, ops, block_first) < _class_id(st, ops, first)
            first = merge_first(best, first, block_best, block_first, smaller)

        total, best = online_add(total, best, block_best, block_sums)
        return (total, best, first), None

    refs = jax.tree.leaves(ops)
    zeros = jnp.zeros((n,), dtype)
    template = block_partial(  # only its structure: which optional sums exist
        jnp.full((n, 1), -jnp.inf, dtype),
        ops.labels,
        0,
        zeros,
        None if ops.class_weights is None else jnp.zeros((1,), dtype),
        _smoothing(st, ops),
    )
    total = jax.tree.map(lambda a: varying_like(jnp.zeros_like(a), refs), template)
    best = varying_like(jnp.full((n,), -jnp.inf, dtype), refs)
    first = varying_like(jnp.zeros((n,), jnp.int32), refs) if st.with_argmax else None
    blocks = jnp.arange(_num_blocks(ops), dtype=jnp.int32)
    (total, best, first), _ = lax.scan(step, (total, best, first), blocks)
    return combine_shards(total, best, first, st.vocab_axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def vocab_rows(st: Static, ops: Operands) -> Rows:
    """Per-position rows; only `loss` carries a gradient."""
    return _finish(st, ops, *_statistics(st, ops))


def _vocab_rows_fwd(st: Static, ops: Operands):
    total, best, first = _statistics(st, ops)
    return _finish(st, ops, total, best, first), (ops, total, best, first)


def _vocab_rows_bwd(st: Static, residuals, cotangents: Rows):
    ops, total, best, first = residuals
    m = safe_shift(best)
    # The loss depends on a block's logits only through the whole-row sums, which add
    # up every block's sums: the cotangents of those sums (O(N), taken once) are the
    # cotangents of each block's. Plain chain rule, so the backward is differentiable
    # again (second derivatives) with the saved sums' own derivatives.
    refs = jax.tree.leaves(ops)

    def finish_loss(t, ls, zl):
        return _finish(st, ops._replace(ls=ls, zl=zl), t, best, first).loss

    # The traced scalar options (None when static) enter only here: their cotangents too.
    loss, finish_vjp = jax.vjp(finish_loss, total, ops.ls, ops.zl)
    ct_sums, ct_ls, ct_zl = finish_vjp(cotangents.loss.astype(loss.dtype))
    # The block's sums vary over every mesh axis of the operands (they are local to a
    # vocabulary shard); the whole-row sums' cotangents may vary over fewer.
    ct_sums = jax.tree.map(lambda c: varying_like(c, refs), ct_sums)
    acc = logits_dtype(ops.x, ops.w)
    mm = jnp.result_type(ops.x.dtype, ops.w.dtype)

    def block_grad(carry, i):
        dx, dw, db = carry
        offset, wb, bb, cwb, mb, lmb = _block(st, ops, i)

        def block_sums(lg):
            # Through the one-pass backward that `cross_entropy` uses.
            mask, off = _mask_and_offset(st, ops, lg, offset, mb, lmb)
            return logit_partial(lg, ops.labels, off, m, cwb, mask, st.softcap, _smoothing(st, ops))

        if st.fused is None:
            lg = project(ops.x, wb, bb)
            _, vjp = jax.vjp(block_sums, lg)
            (dlogits,) = vjp(ct_sums)
            dl = dlogits.astype(gradient_dtype(mm))
            dbias = None if db is None else jnp.sum(dlogits, axis=0, dtype=acc)
        else:
            dl, dbias = _kernel_grad(st, ops, i, ct_sums, m)
        dx = dx + jnp.dot(dl, wb, preferred_element_type=acc)
        dwb = lax.dot_general(dl, ops.x, (((0,), (0,)), ((), ())), preferred_element_type=acc)
        dwb = sum_to_primal_axes(dwb, ops.w).astype(ops.w.dtype)
        dw = put_block(dw, dwb, i, group=st.group)
        if db is not None:
            dbb = sum_to_primal_axes(dbias, ops.bias)
            db = put_block(db, dbb.astype(ops.bias.dtype), i, group=st.group)
        return (dx, dw, db), None

    dx0 = varying_like(jnp.zeros(ops.x.shape, acc), refs)
    dw0 = varying_like(jnp.zeros_like(ops.w), [ops.w])
    db0 = None if ops.bias is None else varying_like(jnp.zeros_like(ops.bias), [ops.bias])
    blocks = jnp.arange(_num_blocks(ops), dtype=jnp.int32)
    (dx, dw, db), _ = lax.scan(block_grad, (dx0, dw0, db0), blocks)
    if st.vocab_axis_name is not None:
        dx = lax.psum(dx, st.vocab_axis_name)
    return (
        Operands(
            x=sum_to_primal_axes(dx, ops.x).astype(ops.x.dtype),
            w=dw,
            bias=db,
            class_weights=None,
            class_mask=None,
            labels=None,
            position_mask=None,
            logit_mask=None,
            ls=None if ct_ls is None else sum_to_primal_axes(ct_ls, ops.ls),
            zl=None if ct_zl is None else sum_to_primal_axes(ct_zl, ops.zl),
        ),
    )


vocab_rows.defvjp(_vocab_rows_fwd, _vocab_rows_bwd)
