"""Memory-lean `linear_cross_entropy` over blocks of the vocabulary.

The V classes are cut into blocks of Bv (padded; padding classes are dropped logits).
Forward: one pass over the blocks with an online log-sum-exp — each block's (N, Bv)
logits update the running row max and the additive sums of `_stable.Partial`
(rescaled when the max grows), exactly the statistics `cross_entropy` uses. Backward:
a second pass recomputes each block's logits and gets their gradient from the same
`_stable.finish_rows`, by perturbing the saved whole-row sums with the block's own
sums (value unchanged, derivative that of the block); dx accumulates in float32
(N x D) and each block's dw is emitted directly in w's dtype.

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
    finish_rows,
    is_off,
    num_classes_global,
    prepare_logits,
    rescale,
    row_max,
    safe_shift,
    shard_max,
)
from .chunked import Static, pick
from .mesh import sum_to_primal_axes, varying_like
from .reference import project


class Operands(NamedTuple):
    """Arrays of one call, classes cut into nb blocks of Bv: x (N, D); w (nb, Bv, D);
    bias, class_weights (nb, Bv) or None; class_mask (nb, Bv) — False on padding;
    labels, position_mask (N,); logit_mask (nb, N, Bv) or None; ls, zl as in chunked."""

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


def _blocks(ops: Operands):
    offsets = jnp.arange(ops.w.shape[0], dtype=jnp.int32) * ops.w.shape[1]
    return offsets, ops.w, ops.bias, ops.class_weights, ops.class_mask, ops.logit_mask


def _prepare(st: Static, ops: Operands, logits, offset, mb, lmb):
    """Prepared (N, Bv) logits of one block (padding and masked classes at -inf) and
    the global id of its first class."""
    mask = jnp.broadcast_to(mb, logits.shape)
    if lmb is not None:
        mask = mask & lmb
    z = prepare_logits(logits, mask, st.softcap)
    return z, offset + class_offset(ops.w.shape[0] * ops.w.shape[1], st.vocab_axis_name)


def _smoothing(st: Static, ops: Operands) -> bool:
    return not is_off(pick(st.label_smoothing, ops.ls))


def _finish(st: Static, ops: Operands, total: Partial, best, first) -> Rows:
    return finish_rows(
        total,
        best,
        first,
        ops.labels,
        num_classes_global(ops.w.shape[0] * ops.w.shape[1], st.vocab_axis_name),
        position_mask=ops.position_mask,
        ignore_index=st.ignore_index,
        label_smoothing=pick(st.label_smoothing, ops.ls),
        z_loss=pick(st.z_loss, ops.zl),
    )


def _statistics(st: Static, ops: Operands):
    """One pass over the vocabulary blocks: whole-row (Partial, best, first)."""
    n = ops.x.shape[0]
    dtype = jnp.float64 if ops.x.dtype == jnp.float64 else jnp.float32

    def step(carry, block):
        total, best, first = carry
        offset, wb, bb, cwb, mb, lmb = block
        z, offset = _prepare(st, ops, project(ops.x, wb, bb), offset, mb, lmb)
        block_best, block_first = row_max(z, offset, st.with_argmax)
        new_best = jnp.maximum(best, block_best)
        if first is not None:
            first = jnp.where(block_best > best, block_first, first)
        m = safe_shift(new_best)
        part = block_partial(z, ops.labels, offset, m, cwb, _smoothing(st, ops))
        total = jax.tree.map(jnp.add, rescale(total, safe_shift(best), m), part)
        return (total, new_best, first), None

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
    (total, best, first), _ = lax.scan(step, (total, best, first), _blocks(ops))

    if st.vocab_axis_name is not None:
        local_shift = safe_shift(best)
        best, first = shard_max(best, first, st.vocab_axis_name)
        total = rescale(total, local_shift, safe_shift(best))
        total = jax.tree.map(lambda a: lax.psum(a, st.vocab_axis_name), total)
    return total, best, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def vocab_rows(st: Static, ops: Operands) -> Rows:
    """Per-position rows; only `loss` carries a gradient."""
    return _finish(st, ops, *_statistics(st, ops))


def _vocab_rows_fwd(st: Static, ops: Operands):
    total, best, first = _statistics(st, ops)
    return _finish(st, ops, total, best, first), (ops, total, best, first)


def _vocab_rows_bwd(st: Static, residuals, cotangents: Rows):
    ops, total, best, first = residuals
    total = lax.stop_gradient(total)
    m = safe_shift(best)
    # The block losses vary over every mesh axis of the operands (the block's sums are
    # local to a vocabulary shard); the incoming cotangent may vary over fewer.
    g = varying_like(cotangents.loss, jax.tree.leaves(ops))
    acc = jnp.float64 if ops.w.dtype == jnp.float64 else jnp.float32
    mm = jnp.result_type(ops.x.dtype, ops.w.dtype)

    def block_grad(carry_dx, block):
        offset, wb, bb, cwb, mb, lmb = block

        def block_loss(lg):
            # Value: the saved whole-row sums; derivative: that of this block's sums.
            z, off = _prepare(st, ops, lg, offset, mb, lmb)
            part = block_partial(z, ops.labels, off, m, cwb, _smoothing(st, ops))
            moved = jax.tree.map(lambda t, p: t + (p - lax.stop_gradient(p)), total, part)
            return _finish(st, ops, moved, best, first).loss

        lg = project(ops.x, wb, bb)
        _, vjp = jax.vjp(block_loss, lg)
        (dlogits,) = vjp(g.astype(lg.dtype))
        dl = dlogits.astype(mm)
        carry_dx = carry_dx + jnp.dot(dl, wb, preferred_element_type=acc)
        dw = lax.dot_general(dl, ops.x, (((0,), (0,)), ((), ())), preferred_element_type=acc)
        dw = sum_to_primal_axes(dw, ops.w).astype(ops.w.dtype)
        db = (
            None
            if bb is None
            else sum_to_primal_axes(jnp.sum(dlogits, axis=0, dtype=acc), ops.bias)
        )
        return carry_dx, (dw, db)

    dx0 = varying_like(jnp.zeros(ops.x.shape, acc), jax.tree.leaves(ops) + [g])
    dx, (dw, db) = lax.scan(block_grad, dx0, _blocks(ops))
    if st.vocab_axis_name is not None:
        dx = lax.psum(dx, st.vocab_axis_name)
    return (
        Operands(
            x=sum_to_primal_axes(dx, ops.x).astype(ops.x.dtype),
            w=dw,
            bias=None if db is None else db.astype(ops.bias.dtype),
            class_weights=None,
            class_mask=None,
            labels=None,
            position_mask=None,
            logit_mask=None,
            ls=None,
            zl=None,
        ),
    )


vocab_rows.defvjp(_vocab_rows_fwd, _vocab_rows_bwd)
