"""Masked, numerically stable per-position statistics of categorical logits.

This module is the one place where the categorical loss formulas live. The public
losses (`_categorical.py`) and every implementation of `linear_cross_entropy`
(`linear/`) call `categorical_rows` on a block of logits, so they agree by
construction.

Conventions: the class axis is the last one; arithmetic is in float32 (float64 for
float64 input); a logit takes part only if `keep` is True, where `keep` excludes
`-inf` logits and logits masked by a logits-shaped `where`. When the class axis is
split over a mesh axis (`vocab_axis_name`), only per-position numbers cross devices:
the max, the sum of exponentials, the label logit and a few sums.
"""

from __future__ import annotations

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


class Stable(NamedTuple):
    """Shifted, masked exponentials of one block of logits.

    z: (..., C) logits with dropped entries set to 0 (so no inf/NaN from a masked
       entry can reach a gradient); m: (...,) row max over kept logits, a
       gradient-free shift (0 when no logit is kept); lse: (...,) log-sum-exp over
       kept logits, -inf where none is kept; e: (..., C) exp(z - m) on kept logits,
       0 elsewhere; s: (...,) Σ e; any_kept: (...,) whether the row keeps a logit.
    """

    z: jax.Array
    m: jax.Array
    lse: jax.Array
    e: jax.Array
    s: jax.Array
    any_kept: jax.Array


def stable_exp(z: jax.Array, keep: jax.Array, vocab_axis_name=None) -> Stable:
    """Row max, exponentials and log-sum-exp of `z` over the kept entries.

    lse_n = m_n + log Σ_c keep[n,c] exp(z[n,c] - m_n),  m_n = max_c {z[n,c] : keep}.
    NaN logits propagate to lse; a row with no kept logit gets lse = -inf and a zero
    gradient.
    """
    z = jnp.where(keep, z, 0)
    m = _pmax(jnp.max(jnp.where(keep, z, -jnp.inf), axis=-1), vocab_axis_name)
    any_kept = ~jnp.isneginf(m)  # NaN rows count as kept, so NaN propagates
    # The shift cancels in lse; stopping its gradient keeps d lse/dz = softmax exactly.
    m = lax.stop_gradient(jnp.where(jnp.isneginf(m), 0, m))
    e = jnp.where(keep, jnp.exp(z - m[..., None]), 0)
    s = _psum(jnp.sum(e, axis=-1), vocab_axis_name)
    # NaN fails `s > 0`; route it through the log so that it propagates.
    has_mass = (s > 0) | jnp.isnan(s)
    lse = jnp.where(has_mass, jnp.log(jnp.where(has_mass, s, 1)) + m, -jnp.inf)
    return Stable(z, m, lse, e, s, any_kept)


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


def first_argmax(z: jax.Array, keep: jax.Array, offset, vocab_axis_name) -> jax.Array:
    """Global id of the first largest kept value of each row, across vocab shards."""
    best, first = row_max(z, keep, offset)
    return shard_max(best, first, vocab_axis_name)[1]


def row_max(z: jax.Array, keep: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    """(max over kept entries, global id of its first occurrence); -inf where none kept."""
    zm = jnp.where(keep, z, -jnp.inf)
    return jnp.max(zm, axis=-1), jnp.argmax(zm, axis=-1) + offset


def shard_max(best, first, vocab_axis_name):
    """Combine `row_max` results across vocab shards: the first shard holding the max wins."""
    if vocab_axis_name is None:
        return best, first
    top = lax.pmax(best, vocab_axis_name)
    first = jnp.where(best == top, first, jnp.iinfo(first.dtype).max)
    return top, lax.pmin(first, vocab_axis_name)


def merge_max(best_a, first_a, best_b, first_b):
    """Combine `row_max` results of two class blocks, block a holding the smaller ids."""
    take_b = best_b > best_a
    return jnp.where(take_b, best_b, jnp.maximum(best_a, best_b)), jnp.where(
        take_b, first_b, first_a
    )


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


def block_partial(z, keep, labels, offset, m, class_weights, smoothing: bool) -> Partial:
    """Partial sums of one block of classes (class axis last, ids offset..offset+C)."""
    z = jnp.where(keep, z, 0)
    ids = lax.broadcasted_iota(labels.dtype, (z.shape[-1],), 0) + offset
    is_label = ids == labels[..., None]
    dtype = z.dtype
    w = None if class_weights is None else class_weights.astype(dtype)
    kw = None
    if smoothing:
        kw = keep.astype(dtype) if w is None else jnp.where(keep, w, 0)
    return Partial(
        s=jnp.sum(jnp.where(keep, jnp.exp(z - m[..., None]), 0), axis=-1),
        z_label=jnp.sum(jnp.where(is_label, z, 0), axis=-1),
        label_hits=jnp.sum(is_label & keep, axis=-1, dtype=dtype),
        w_label=None if w is None else jnp.sum(jnp.where(is_label, w, 0), axis=-1),
        kw_sum=None if kw is None else jnp.sum(kw, axis=-1),
        below_max=None if kw is None else jnp.sum(kw * (m[..., None] - z), axis=-1),
        count=None if kw is None else jnp.sum(keep, axis=-1, dtype=dtype),
    )


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
    # NaN fails `s > 0`; route it through the log so that it propagates.
    has_mass = (p.s > 0) | jnp.isnan(p.s)
    lse_all = jnp.where(has_mass, jnp.log(jnp.where(has_mass, p.s, 1)) + m, -jnp.inf)
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
    correct = jnp.where(lax.stop_gradient(first) == labels, weight, 0)
    return Rows(loss, lse_all, jnp.where(valid, zl, 0), valid, weight, correct)


def prepare_logits(logits, logit_mask, softcap):
    """Upcast, soft-cap, and the mask of kept logits (not -inf, not masked out)."""
    x = logits.astype(compute_dtype(logits.dtype))
    keep = x != -jnp.inf
    if logit_mask is not None:
        keep = keep & logit_mask
    return apply_softcap(x, softcap), keep


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
    z, keep = prepare_logits(logits, logit_mask, softcap)
    num_local = logits.shape[-1]
    offset = class_offset(num_local, vocab_axis_name)
    best, first = shard_max(*row_max(z, keep, offset), vocab_axis_name)
    partial = block_partial(
        z,
        keep,
        labels,
        offset,
        safe_shift(best),
        class_weights,
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
) -> Rows:
    """Per-position cross-entropy with probability targets (SPEC §2), class axis last.

    Shapes: logits and targets (..., C); masks and weights as in `categorical_rows`.

        t'[n,c] = (1-ε) t[n,c] + ε/C_n          (ε/C_n on kept logits only)
        l_n     = v_n * (-Σ_c w[c] t'[n,c] lp[n,c] + z_loss * lse_n²)

    A dropped logit with zero target contributes 0 (0 * -inf = 0); one with a
    non-zero target makes the loss +inf. `weight` is v_n (mean over valid positions)
    and `correct` is [argmax z == argmax t].
    """
    dtype = compute_dtype(logits.dtype)
    x = logits.astype(dtype)
    keep = x != -jnp.inf
    if logit_mask is not None:
        keep = keep & logit_mask
    st = stable_exp(apply_softcap(x, softcap), keep, vocab_axis_name)

    t = targets.astype(dtype)
    smoothing_on = not (isinstance(label_smoothing, float) and label_smoothing == 0.0)
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
    below_max = _psum(jnp.sum(kwt * (st.m[..., None] - st.z), axis=-1), vocab_axis_name)
    loss = jnp.where(lost_mass, jnp.inf, (lse - st.m) * kwt_sum + below_max)
    if smoothing_on:
        loss = jnp.where((label_smoothing >= 0) & (label_smoothing <= 1), loss, jnp.nan)

    zl = jnp.zeros_like(loss)
    if not (isinstance(z_loss, float) and z_loss == 0.0):
        zl = jnp.where(z_loss >= 0, z_loss * lse**2, jnp.nan)
        loss = loss + zl

    weight = valid.astype(dtype)
    offset = class_offset(logits.shape[-1], vocab_axis_name)
    same = first_argmax(st.z, keep, offset, vocab_axis_name) == first_argmax(
        targets.astype(dtype), keep, offset, vocab_axis_name
    )
    correct = jnp.where(lax.stop_gradient(same), weight, 0)
    return Rows(jnp.where(valid, loss, 0), st.lse, jnp.where(valid, zl, 0), valid, weight, correct)
