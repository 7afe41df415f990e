"""Masked, numerically stable per-position statistics of categorical logits.

This module is the one place where the categorical loss formulas live. The public
losses (`_categorical.py`) and every implementation of `linear_cross_entropy`
(`linear/`) call `categorical_rows` on a block of logits, so they agree by
construction.

Conventions: the class axis is the last one; arithmetic is in float32 (float64 for
float64 input); a dropped logit (a `-inf` logit, or one masked by a logits-shaped
`where`) is represented by z = -inf after `prepare_logits`, so exp, max and argmax
skip it with no extra masking pass over the logits (the common unmasked case costs
what a plain log-softmax costs). When the class axis is
split over a mesh axis (`vocab_axis_name`), only per-position numbers cross devices:
the max, the sum of exponentials, the label logit and a few sums.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def apply_softcap(x: jax.Array, softcap: float | None) -> jax.Array:
    """z = softcap * tanh(x / softcap) (Gemma-2 style soft-capping); identity for None."""
    return x if softcap is None else softcap * jnp.tanh(x / softcap)


def _pmax(x, axis_name):
    return x if axis_name is None else lax.pmax(x, axis_name)


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def class_offset(num_local: int, axis_name) -> jax.Array | int:
    """Global id of this shard's first class (0 when the class axis is not split)."""
    return 0 if axis_name is None else lax.axis_index(axis_name) * num_local


def num_classes_global(num_local: int, axis_name) -> int:
    return num_local if axis_name is None else num_local * lax.axis_size(axis_name)


def prepare_logits(logits: jax.Array, logit_mask: jax.Array | None, softcap: float | None):
    """Upcast and soft-cap; dropped logits (-inf or masked out) become -inf.

    A masked-out logit is replaced before the soft-cap, so a NaN or inf under a False
    mask reaches neither the loss nor the gradient.
    """
    x = logits.astype(compute_dtype(logits.dtype))
    if softcap is None and logit_mask is None:
        return x
    keep = x != -jnp.inf
    if logit_mask is not None:
        keep = keep & logit_mask
    if softcap is not None:
        x = apply_softcap(jnp.where(keep, x, 0), softcap)  # tanh(-inf) would be finite
    return jnp.where(keep, x, -jnp.inf)


def kept(z: jax.Array) -> jax.Array:
    return z != -jnp.inf


def lse_from_sum(s: jax.Array, m: jax.Array) -> jax.Array:
    """m + log s; -inf where s == 0 (no kept logit), with a clean zero gradient there.

    NaN fails `s > 0`, so it is routed through the log and propagates.
    """
    has_mass = (s > 0) | jnp.isnan(s)
    return jnp.where(has_mass, jnp.log(jnp.where(has_mass, s, 1)) + m, -jnp.inf)


class Stable(NamedTuple):
    """Log-sum-exp pieces of prepared logits z (dropped entries -inf), class axis last.

    m: (...,) gradient-free shift (the row max, 0 for a row with nothing kept);
    any_kept: (...,) whether the row keeps a logit (True for NaN rows, so NaN
    propagates); e: (..., C) exp(z - m); s: Σ e; lse: (...,) m + log s (-inf when
    nothing is kept).
    """

    m: jax.Array
    any_kept: jax.Array
    e: jax.Array
    s: jax.Array
    lse: jax.Array


def stable_exp(z: jax.Array, vocab_axis_name=None) -> Stable:
    """lse_n = m_n + log Σ_c exp(z[n,c] - m_n), m_n = max_c z[n,c], across vocab shards."""
    best = _pmax(lax.stop_gradient(jnp.max(z, axis=-1)), vocab_axis_name)
    m = safe_shift(best)
    e = jnp.exp(z - m[..., None])
    s = _psum(jnp.sum(e, axis=-1), vocab_axis_name)
    return Stable(m, ~jnp.isneginf(best), e, s, lse_from_sum(s, m))


class Rows(NamedTuple):
    """Per-position results of the categorical loss (positions shape each).

    loss: l_n (0 where dropped, NaN for an out-of-range label); lse: log-sum-exp;
    z_loss: the z-loss part of l_n; valid: v_n; weight: v_n * w[y_n];
    correct: v_n * w[y_n] * [argmax_c z[n, c] == y_n].
    """

    loss: jax.Array
    lse: jax.Array
    z_loss: jax.Array
    valid: jax.Array
    weight: jax.Array
    correct: jax.Array


def first_argmax(z: jax.Array, offset, vocab_axis_name) -> jax.Array:
    """Global id of the first largest value of each row, across vocab shards."""
    return shard_max(*row_max(z, offset), vocab_axis_name)[1]


def row_max(z: jax.Array, offset, with_argmax: bool = True):
    """(row max, global id of its first occurrence or None); -inf where nothing is kept.
    The argmax is a second reduction: skip it unless accuracy is wanted."""
    first = jnp.argmax(z, axis=-1).astype(jnp.int32) + offset if with_argmax else None
    return jnp.max(z, axis=-1), first


def shard_max(best, first, vocab_axis_name):
    """Combine `row_max` results across vocab shards: the first shard holding the max wins."""
    if vocab_axis_name is None:
        return best, first
    best = lax.stop_gradient(best)  # a shift only; pmax has no derivative rule
    top = lax.pmax(best, vocab_axis_name)
    if first is None:
        return top, None
    first = jnp.where(best == top, first, jnp.iinfo(first.dtype).max)
    return top, lax.pmin(first, vocab_axis_name)


class Partial(NamedTuple):
    """Additive per-row sums over a block of classes, all taken with one shift m.

    Sums over blocks (or `psum` over vocab shards) give the statistics of the whole
    row; `finish_rows` turns them into the loss. Optional fields are None when the
    option that needs them is off.

    s: Σ_keep e^(z-m); z_label: z[y]; label_hits: [label is a kept class of the block];
    w_label: w[y]; kw_sum: Σ_keep w; below_max: Σ_keep w (m - z); count: Σ keep.
    """

    s: jax.Array
    z_label: jax.Array
    label_hits: jax.Array
    w_label: jax.Array | None = None
    kw_sum: jax.Array | None = None
    below_max: jax.Array | None = None
    count: jax.Array | None = None


def safe_shift(best: jax.Array) -> jax.Array:
    """The gradient-free shift m: the row max, or 0 for a row with nothing kept."""
    return lax.stop_gradient(jnp.where(jnp.isneginf(best), 0, best))


def block_partial(z, labels, offset, m, class_weights, smoothing: bool, e=None) -> Partial:
    """Partial sums of one block of prepared logits (class ids offset..offset+C).

    The label's logit and weight are gathered (O(N)), not found by comparing every
    class id with the label (O(N·C)); a label outside the block contributes 0.
    `e`, when given, is exp(z - m) already computed by the caller.
    """
    dtype = z.dtype
    local = labels - offset
    in_block = (local >= 0) & (local < z.shape[-1])
    local = jnp.clip(local, 0, z.shape[-1] - 1)
    z_label = jnp.take_along_axis(z, local[..., None], axis=-1)[..., 0]
    hit = in_block & kept(z_label)
    w = None if class_weights is None else class_weights.astype(dtype)
    kw = None
    if smoothing:
        keep = kept(z)
        kw = keep.astype(dtype) if w is None else jnp.where(keep, w, 0)
    return Partial(
        s=jnp.sum(jnp.exp(z - m[..., None]) if e is None else e, axis=-1),
        z_label=jnp.where(hit, z_label, 0),
        label_hits=hit.astype(dtype),
        w_label=None if w is None else jnp.where(in_block, w[local], 0),
        kw_sum=None if kw is None else jnp.sum(kw, axis=-1),
        below_max=None if kw is None else jnp.sum(jnp.where(keep, kw * (m[..., None] - z), 0), -1),
        count=None if kw is None else jnp.sum(keep, axis=-1, dtype=dtype),
    )


def logit_partial(logits, labels, offset, m, class_weights, logit_mask, softcap, smoothing):
    """`block_partial(prepare_logits(logits, logit_mask, softcap), ...)` from raw logits,
    with a backward that writes the logits' gradient in one elementwise pass.

    Autodiff would write a float32 gradient, scatter the label's share into it and
    convert it to the logits' dtype: three passes. Here the backward is one fused
    pass from the cotangents of the few per-row sums (how the loss depends on them is
    left to autodiff of `finish_rows`, O(N)). Where exp(z - m) comes from depends on
    the backend:

    - accelerators (memory-bound): recomputed from the logits, so nothing logits-sized
      is stored; per element the backward moves 4 bytes for bfloat16 logits.
    - CPU (compute-bound elementwise loops): the forward's float32 exp(z - m) is saved
      and reused, because recomputing exp measured 2x slower there (N=4096, C=1000).

    No gradient flows to `class_weights`.
    """
    args = (logits, labels, offset, lax.stop_gradient(m), class_weights, logit_mask)

    def saved_exp(*args):
        return _logit_partial(softcap, smoothing, True, *args)

    def recompute(*args):
        return _logit_partial(softcap, smoothing, False, *args)

    return lax.platform_dependent(*args, cpu=saved_exp, default=recompute)


def _prepared_exp(logits, m, logit_mask, softcap):
    z = prepare_logits(logits, logit_mask, softcap)
    return z, jnp.exp(z - m[..., None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _logit_partial(
    softcap, smoothing, save_exp, logits, labels, offset, m, class_weights, logit_mask
):
    z, e = _prepared_exp(logits, m, logit_mask, softcap)
    return block_partial(z, labels, offset, m, class_weights, smoothing, e)


def _logit_partial_fwd(
    softcap, smoothing, save_exp, logits, labels, offset, m, class_weights, logit_mask
):
    z, e = _prepared_exp(logits, m, logit_mask, softcap)
    out = block_partial(z, labels, offset, m, class_weights, smoothing, e)
    saved = e if save_exp else None
    return out, (logits, labels, offset, m, class_weights, logit_mask, saved, out.label_hits > 0)


def _logit_partial_bwd(softcap, smoothing, save_exp, residuals, ct: Partial):
    """d/dz of each sum: s -> exp(z - m); z_label -> [c == y]; below_max -> -w[c]
    (kept logits only); then the soft-cap's slope 1 - tanh²."""
    logits, labels, offset, m, class_weights, logit_mask, e, hit = residuals
    x = logits.astype(compute_dtype(logits.dtype))
    keep = None
    if not save_exp or smoothing or softcap is not None or logit_mask is not None:
        keep = x != -jnp.inf
        if logit_mask is not None:
            keep = keep & logit_mask
    z, slope = x, None
    if softcap is not None:
        t = jnp.tanh(jnp.where(keep, x, 0) / softcap)
        z, slope = softcap * t, 1 - t * t
    if e is None:
        e = jnp.exp(jnp.where(keep, z, -jnp.inf) - m[..., None])
    # A dropped logit has e = 0 and is never the label of a hit row, so without
    # smoothing, softcap or mask `keep` is not needed: the plain CPU case reads only e.
    ids = lax.broadcasted_iota(labels.dtype, (x.shape[-1],), 0) + offset
    dz = ct.s[..., None] * e
    at_label = (ids == labels[..., None]) & hit[..., None]
    dz = dz + jnp.where(at_label, ct.z_label[..., None], 0)
    if smoothing:
        w = 1 if class_weights is None else class_weights.astype(x.dtype)
        dz = dz - ct.below_max[..., None] * w
    if slope is not None:
        dz = dz * slope
    if keep is not None:
        dz = jnp.where(keep, dz, 0)
    return dz.astype(logits.dtype), None, None, None, None, None


_logit_partial.defvjp(_logit_partial_fwd, _logit_partial_bwd)


def rescale(p: Partial, m_old: jax.Array, m_new: jax.Array) -> Partial:
    """Re-express sums taken with shift m_old in terms of shift m_new (online lse)."""
    below = None if p.below_max is None else p.below_max + (m_new - m_old) * p.kw_sum
    return p._replace(s=p.s * jnp.exp(m_old - m_new), below_max=below)


def psum_partial(p: Partial, vocab_axis_name) -> Partial:
    return p if vocab_axis_name is None else jax.tree.map(lambda a: lax.psum(a, vocab_axis_name), p)


def is_off(option) -> bool:
    """A static option value of exactly 0.0 switches its term off at trace time."""
    return isinstance(option, float) and option == 0.0


def finish_rows(
    p: Partial,
    best,
    first,
    labels,
    num_classes,
    *,
    position_mask,
    ignore_index,
    label_smoothing,
    z_loss,
) -> Rows:
    """Per-position loss from whole-row statistics (see `categorical_rows`)."""
    m = safe_shift(best)
    dtype = p.s.dtype
    valid = ~jnp.isneginf(best)  # NaN rows count as kept, so NaN propagates
    if position_mask is not None:
        valid = valid & position_mask
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    lse_all = lse_from_sum(p.s, m)
    lse = jnp.where(valid, lse_all, 0)  # keeps inf/NaN of dropped rows out of gradients
    w_label = jnp.ones(labels.shape, dtype) if p.w_label is None else p.w_label

    nll = jnp.where(p.label_hits > 0, lse - p.z_label, jnp.inf)
    label_coef = (1 - label_smoothing) * w_label
    loss = jnp.where(label_coef == 0, 0, label_coef * nll)
    if not is_off(label_smoothing):
        smooth = ((lse - m) * p.kw_sum + p.below_max) / jnp.maximum(p.count, 1)
        loss = loss + label_smoothing * smooth
        # Scheduled (array) ε outside [0, 1] cannot be caught at trace time: NaN, not a wrong loss.
        loss = jnp.where((label_smoothing >= 0) & (label_smoothing <= 1), loss, jnp.nan)
    zl = jnp.zeros_like(loss)
    if not is_off(z_loss):
        zl = jnp.where(z_loss >= 0, z_loss * w_label * lse**2, jnp.nan)
        loss = loss + zl

    weight = jnp.where(valid, w_label, 0)
    in_range = (labels >= 0) & (labels < num_classes)
    loss = jnp.where(valid, loss, 0)
    loss = jnp.where(valid & ~in_range, jnp.nan, loss)
    correct = None if first is None else jnp.where(lax.stop_gradient(first) == labels, weight, 0)
    return Rows(loss, lse_all, jnp.where(valid, zl, 0), valid, weight, correct)


def categorical_rows(
    logits: jax.Array,
    labels: jax.Array,
    *,
    logit_mask: jax.Array | None = None,
    position_mask: jax.Array | None = None,
    ignore_index: int | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    softcap: float | None = None,
    vocab_axis_name=None,
    with_argmax: bool = True,
) -> Rows:
    """Per-position cross-entropy with integer labels (SPEC §1), class axis last.

    Shapes: logits (..., C) any floating dtype (C local classes when the class axis
    is split over `vocab_axis_name`), labels (...,) global class ids, logit_mask
    (..., C) or None, position_mask (...,) or None, class_weights (C,) or None.

        z        = softcap * tanh(logits / softcap)          (if softcap)
        lp[n,c]  = z[n,c] - lse_n
        l_n = v_n * ((1-ε) w[y_n] (-lp[n,y_n]) + (ε/C_n) Σ_c w[c] (-lp[n,c])
                     + z_loss w[y_n] lse_n²)

    with C_n the number of kept logits of row n. The smoothing sum is evaluated as
    (lse - m) Σ w + Σ w (m - z), two non-negative terms, so no cancellation even for
    logits of 1e30. Computed in three steps shared with `linear_cross_entropy`:
    `row_max` (the shift), `block_partial` (additive sums), `finish_rows`.
    """
    num_local = logits.shape[-1]
    offset = class_offset(num_local, vocab_axis_name)
    # Without softcap or mask z is the upcast logits, and the max (exact in any dtype)
    # is taken on the logits themselves: no float32 copy is formed to reduce over.
    plain = softcap is None and logit_mask is None
    z = logits if plain else prepare_logits(logits, logit_mask, softcap)
    best, first = row_max(z, offset, with_argmax)
    best, first = shard_max(best.astype(compute_dtype(logits.dtype)), first, vocab_axis_name)
    partial = logit_partial(
        logits,
        labels,
        offset,
        safe_shift(best),
        class_weights,
        logit_mask,
        softcap,
        smoothing=not is_off(label_smoothing),
    )
    return finish_rows(
        psum_partial(partial, vocab_axis_name),
        best,
        first,
        labels,
        num_classes_global(num_local, vocab_axis_name),
        position_mask=position_mask,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )


def soft_rows(
    logits: jax.Array,
    targets: jax.Array,
    *,
    logit_mask: jax.Array | None = None,
    position_mask: jax.Array | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    softcap: float | None = None,
    vocab_axis_name=None,
    with_argmax: bool = True,
) -> Rows:
    """Per-position cross-entropy with probability targets (SPEC §2), class axis last.

    Shapes: logits and targets (..., C); masks and weights as in `categorical_rows`.

        t'[n,c] = (1-ε) t[n,c] + ε/C_n          (ε/C_n on kept logits only)
        l_n     = v_n * (-Σ_c w[c] t'[n,c] lp[n,c] + z_loss * lse_n²)

    A dropped logit with zero target contributes 0 (0 * -inf = 0); one with a
    non-zero target makes the loss +inf. `weight` is v_n (mean over valid positions)
    and `correct` is [argmax z == argmax t].
    """
    z = prepare_logits(logits, logit_mask, softcap)
    dtype = z.dtype
    keep = kept(z)
    st = stable_exp(z, vocab_axis_name)

    t = targets.astype(dtype)
    smoothing_on = not is_off(label_smoothing)
    if smoothing_on:
        count = _psum(jnp.sum(keep, axis=-1, dtype=dtype), vocab_axis_name)
        share = label_smoothing / jnp.maximum(count, 1)
        t = (1 - label_smoothing) * t + jnp.where(keep, share[..., None], 0)
    wt = t if class_weights is None else t * class_weights.astype(dtype)
    kwt = jnp.where(keep, wt, 0)
    lost_mass = _psum(jnp.sum(~keep & (wt != 0), axis=-1), vocab_axis_name) > 0

    valid = st.any_kept if position_mask is None else st.any_kept & position_mask
    lse = jnp.where(valid, st.lse, 0)
    kwt_sum = _psum(jnp.sum(kwt, axis=-1), vocab_axis_name)
    below = jnp.where(keep, kwt * (st.m[..., None] - z), 0)
    below_max = _psum(jnp.sum(below, axis=-1), vocab_axis_name)
    loss = jnp.where(lost_mass, jnp.inf, (lse - st.m) * kwt_sum + below_max)
    if smoothing_on:
        loss = jnp.where((label_smoothing >= 0) & (label_smoothing <= 1), loss, jnp.nan)

    zl = jnp.zeros_like(loss)
    if not is_off(z_loss):
        zl = jnp.where(z_loss >= 0, z_loss * lse**2, jnp.nan)
        loss = loss + zl

    weight = valid.astype(dtype)
    correct = None
    if with_argmax:
        offset = class_offset(logits.shape[-1], vocab_axis_name)
        target_top = jnp.where(keep, targets.astype(dtype), -jnp.inf)
        same = first_argmax(z, offset, vocab_axis_name) == first_argmax(
            target_top, offset, vocab_axis_name
        )
        correct = jnp.where(lax.stop_gradient(same), weight, 0)
    return Rows(jnp.where(valid, loss, 0), st.lse, jnp.where(valid, zl, 0), valid, weight, correct)
