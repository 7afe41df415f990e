"""Masked, numerically stable per-position statistics of categorical logits.

This module is the one place where the categorical loss formulas live. The public
losses (`_categorical.py`), the Pallas kernel (`pallas/`) and every implementation of
`linear_cross_entropy` (`linear/`) build the loss from the same pieces — per-row
additive sums (`block_partial` / `class_sums`, combined with `rescale`) finished by
`finish_rows` — so they agree by construction.

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


def vocab_psum(x, axis_name):
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


def row_max(z: jax.Array, offset, with_argmax: bool = True):
    """(row max, global id of its first occurrence or None); -inf where nothing is kept.
    The argmax is a second reduction: skip it unless accuracy is wanted."""
    first = jnp.argmax(z, axis=-1).astype(jnp.int32) + offset if with_argmax else None
    return jnp.max(z, axis=-1), first


def merge_first(best, first, block_best, block_first, block_smaller):
    """A row's first argmax over the classes seen so far (`best`: their max, NaN once a
    NaN was seen; `first`: its id) and a new block of them (`block_best`,
    `block_first`), as `jnp.argmax` over the whole row: NaN beats every number, and
    among equal maxima (or NaNs) the smaller id wins. `block_smaller`: whether
    block_first is the smaller id (blocks need not come in class order)."""
    block_nan, nan_seen = jnp.isnan(block_best), jnp.isnan(best)
    better = block_nan | (block_best > best) | ((block_best == best) & block_smaller)
    return jnp.where(jnp.where(nan_seen, block_nan & block_smaller, better), block_first, first)


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


def label_index(labels, offset, num_local: int):
    """Column of each label in a block of classes offset..offset+num_local (clipped into
    the block), and whether the label lies in the block."""
    local = labels - offset
    in_block = (local >= 0) & (local < num_local)
    return jnp.clip(local, 0, num_local - 1), in_block


def at_label(a: jax.Array, local: jax.Array) -> jax.Array:
    """a[..., local]: one gathered entry per row (O(N), not a pass over the classes)."""
    return jnp.take_along_axis(a, local[..., None], axis=-1)[..., 0]


def label_terms(z_label, in_block, w_label) -> dict:
    """The label fields of `Partial` from the label's prepared logit z[y] and weight w[y]
    (None without class weights); a label outside the block contributes 0."""
    hit = in_block & kept(z_label)
    return dict(
        z_label=jnp.where(hit, z_label, 0),
        label_hits=hit.astype(z_label.dtype),
        w_label=None if w_label is None else jnp.where(in_block, w_label, 0),
    )


def tile_label_terms(z, col, labels, valid, w) -> dict:
    """`label_terms` of a tile of prepared logits z (rows, classes) in a kernel, from one
    compare per logit: col, the tile's class ids, and valid, which of them are real
    classes (both broadcastable to z); labels (rows,); w the tile's class weights
    (broadcastable to z) or None. int32 counts: 64-bit values reach no kernel under
    x64."""
    is_label = (col == labels[:, None]) & valid
    in_tile = jnp.max(is_label.astype(jnp.int32), axis=-1) > 0
    z_label = jnp.sum(jnp.where(is_label, z, 0), axis=-1)
    w_label = None if w is None else jnp.sum(jnp.where(is_label, w, 0), axis=-1)
    return label_terms(z_label, in_tile, w_label)


def class_sums(z, m, w, smoothing: bool, e=None) -> Partial:
    """The sums over classes of `Partial` (label fields None) for prepared logits z
    (..., C), shift m (...,) and class weights w (C,) or None:

        s = Σ_keep e^(z-m);  kw_sum = Σ_keep w;  below_max = Σ_keep w (m - z);  count = Σ keep

    `e`, when given, is exp(z - m) already computed by the caller. Elementwise ops and
    row sums only, so the Pallas kernel runs this same code on each tile.
    """
    s = jnp.sum(jnp.exp(z - m[..., None]) if e is None else e, axis=-1)
    if not smoothing:
        return Partial(s=s, z_label=None, label_hits=None)
    keep = kept(z)
    kw = kept_weights(keep, w, z.dtype)
    return Partial(
        s=s,
        z_label=None,
        label_hits=None,
        kw_sum=jnp.sum(kw, axis=-1),
        below_max=jnp.sum(jnp.where(keep, kw * (m[..., None] - z), 0), axis=-1),
        count=jnp.sum(keep, axis=-1, dtype=z.dtype),
    )


def kept_weights(keep, w, dtype):
    """Per logit, the class weight where kept (1 without weights), 0 where dropped: the
    terms of kw_sum, and the weights of below_max = Σ_keep w (m - z)."""
    return keep.astype(dtype) if w is None else jnp.where(keep, w, 0)


def target_terms(keep, t, w):
    """Per logit, (w t where kept, else 0; `lost_mass`): the terms of `SoftPartial`'s
    wt_sum (and the weights of wt_below) and of lost, for targets t and class weights w
    or None."""
    wt = t if w is None else t * w
    return jnp.where(keep, wt, 0), lost_mass(keep, wt)


def block_partial(z, labels, offset, m, class_weights, smoothing: bool, e=None) -> Partial:
    """Partial sums of one block of prepared logits (class ids offset..offset+C).

    The label's logit and weight are gathered (O(N)), not found by comparing every
    class id with the label (O(N·C)); a label outside the block contributes 0.
    `e`, when given, is exp(z - m) already computed by the caller.
    """
    local, in_block = label_index(labels, offset, z.shape[-1])
    w = None if class_weights is None else class_weights.astype(z.dtype)
    labelled = label_terms(at_label(z, local), in_block, None if w is None else w[local])
    return class_sums(z, m, w, smoothing, e)._replace(**labelled)


def logit_label_terms(logits, labels, offset, class_weights, logit_mask, softcap) -> dict:
    """`label_terms` from raw logits: gather the label's logit (and mask entry), then
    prepare just those N values — for callers that never form the prepared logits."""
    local, in_block = label_index(labels, offset, logits.shape[-1])
    mask = None if logit_mask is None else at_label(logit_mask, local)
    z_label = prepare_logits(at_label(logits, local), mask, softcap)
    w = None if class_weights is None else class_weights.astype(z_label.dtype)[local]
    return label_terms(z_label, in_block, w)


def logit_partial(
    logits, labels, offset, m, class_weights, logit_mask, softcap, smoothing, apart=False
):
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

    `apart`: recompute from the logits behind an optimization barrier (`_own_copy`),
    for logits that are an input of the whole computation: then XLA cannot merge the
    backward's soft-cap and exp with the forward's. No gradient flows to
    `class_weights`.
    """
    args = (logits, labels, offset, lax.stop_gradient(m), class_weights, logit_mask)
    return _exp_saved_on_cpu(_logit_partial, _logit_sums, softcap, smoothing, args, apart)


def _exp_saved_on_cpu(one_pass, sums, softcap, smoothing, args, apart):
    """`one_pass(softcap, smoothing, exp, fields, *args)` (a custom_vjp returning the
    stacked sums) with exp = "saved" on CPU, decided at lowering, else "recomputed" (or
    "recomputed apart", `_own_copy`); the sums unstacked to the structure
    `sums(softcap, smoothing, *args)[0]` has."""
    fields = structure_of(lambda *a: sums(softcap, smoothing, *a)[0], *args)

    def saved_exp(*args):
        return one_pass(softcap, smoothing, "saved", fields, *args)

    def recompute(*args):
        exp = "recomputed apart" if apart else "recomputed"
        return one_pass(softcap, smoothing, exp, fields, *args)

    return unstacked(fields, lax.platform_dependent(*args, cpu=saved_exp, default=recompute))


def structure_of(fn, *args):
    """The pytree structure of fn(*args), from an abstract evaluation (no computation)."""
    return jax.tree.structure(jax.eval_shape(fn, *args))


def stacked(sums) -> jax.Array:
    """The per-row sums of a `Partial` / `SoftPartial` stacked into one (k, ...) array.

    The `custom_vjp`s of the sums return them so, because JAX batches a `custom_vjp`'s
    outputs one by one: under `jax.vmap` over the labels (or targets, or class weights)
    but not the logits, s depends on unbatched inputs only and comes out unbatched, the
    label's terms batched. The backward then runs batched with the cotangent of s
    already summed over the batch, and the logits' gradient, unbatched, sums it over
    the batch once more: `jax.grad` of such a `vmap` counted the softmax term once per
    batch element. One stacked output is batched as a whole.
    """
    return jnp.stack(jax.tree.leaves(sums))


def unstacked(fields, a: jax.Array):
    """`stacked` undone: the sums with the pytree structure `fields`."""
    return jax.tree.unflatten(fields, [a[i] for i in range(a.shape[0])])


def _prepared_exp(logits, m, logit_mask, softcap):
    z = prepare_logits(logits, logit_mask, softcap)
    return z, jnp.exp(z - m[..., None])


def _logit_sums(softcap, smoothing, logits, labels, offset, m, class_weights, logit_mask):
    """(`Partial` of the raw logits, exp(z - m)). The label's logit is gathered from the
    raw logits, not from z: with z read by the sums alone, XLA:TPU fuses the float32
    upcast of bfloat16 logits into the sums instead of writing a float32 copy of the
    logits for them and the gather (5 logits-sized transfers instead of 4,
    `python -m benchmarks.deviceless --target v5p`)."""
    z, e = _prepared_exp(logits, m, logit_mask, softcap)
    w = None if class_weights is None else class_weights.astype(z.dtype)
    labelled = logit_label_terms(logits, labels, offset, class_weights, logit_mask, softcap)
    return class_sums(z, m, w, smoothing, e)._replace(**labelled), e


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _logit_partial(softcap, smoothing, exp, fields, *args):
    return stacked(_logit_sums(softcap, smoothing, *args)[0])


def _logit_partial_fwd(softcap, smoothing, exp, fields, *args):
    out, e = _logit_sums(softcap, smoothing, *args)
    hit = out.label_hits > 0
    return stacked(out), (*args, e if exp == "saved" else None, hit)


def _logit_partial_bwd(softcap, smoothing, exp, fields, residuals, ct):
    logits, labels, offset, m, class_weights, logit_mask, e, hit = residuals
    if exp == "recomputed apart":
        logits, logit_mask = _own_copy(logits, logit_mask)
    grad = partial_grad(unstacked(fields, ct), logits, labels, offset, m, class_weights,
                        logit_mask, hit, softcap, smoothing, e)  # fmt: skip
    return grad, None, None, None, None, None


def column(flags: jax.Array) -> jax.Array:
    """Per-row flags (...,) as (..., 1), through int32: Mosaic TPU cannot reshape a
    vector of booleans, and the TPU kernels run this module's formulas."""
    return flags.astype(jnp.int32)[..., None] != 0


def _live(ct) -> jax.Array:
    """Rows (...,) with a non-zero cotangent on a sum the logits' gradient depends on. A
    NaN cotangent is live, so NaN in a kept row propagates."""
    fields = ("s", "z_label", "below_max", "wt_sum", "wt_below")
    return functools.reduce(
        jnp.logical_or, (getattr(ct, f) != 0 for f in fields if getattr(ct, f, None) is not None)
    )


def _constant_where_dead(live, a: jax.Array) -> jax.Array:
    """`a` (..., C), held constant (no derivative) in the rows not `live` (a column of
    `_live`, zero cotangent): their
    gradient is ct times something, 0, and so is its derivative in the logits — even
    for padding rows of huge or non-finite logits, whose tangents would otherwise give
    0 · NaN in second derivatives. (In value it is `a`; only its derivative changes.)"""
    return jnp.where(live, a, lax.stop_gradient(a))


@jax.custom_jvp
def _zero_where_dead(live, grad: jax.Array) -> jax.Array:
    """`grad` (..., C) set to 0 in the rows not `live` (a column of `_live`: zero
    cotangent).

    A dropped position gets zero cotangents (`_without_dropped`), and its gradient must
    be exactly 0 even where its logits are NaN or inf (0 * NaN would be NaN): padding
    rows may hold anything. Elementwise, so the backward stays one pass. The
    derivative (`_zero_where_dead_jvp`) is that of zeroing only the non-finite entries
    of those rows: their finite entries are ct times something, 0 in value, but their
    derivative in the cotangent is not, and second derivatives taken where a row's
    cotangent happens to be 0 (a loss coefficient at 0, a zero residual) need it. The
    value keeps the plain select on `live`: with an `isfinite` test in it, XLA:TPU
    wrote the materialised reference's bf16 logit gradient to memory instead of fusing
    it into both matmuls (+2 GiB at the Llama-3 head, v5p, compiled without one)."""
    return jnp.where(live, grad, 0)


@_zero_where_dead.defjvp
def _zero_where_dead_jvp(primals, tangents):
    live, grad = primals
    return jnp.where(live, grad, 0), jnp.where(live | jnp.isfinite(grad), tangents[1], 0)


def _own_copy(logits, logit_mask):
    """The inputs a backward recomputes from, behind an optimization barrier (an
    identity, free at run time), so that XLA cannot merge (CSE) the backward's soft-cap
    and exp with the forward's: merged, XLA:GPU wrote them as a float32 logits-sized
    array in the forward and read it back in the backward (8 logits-sized transfers
    instead of 4 with a soft-cap; `python -m benchmarks.deviceless`). Not for logits
    formed inside a backward (`linear.lean`): there it only kept a mask from fusing."""
    return lax.optimization_barrier((logits, logit_mask))


def partial_grad(
    ct: Partial, logits, labels, offset, m, class_weights, logit_mask, hit, softcap, smoothing, e
):
    """The logits' gradient of Σ ct · Partial in one elementwise pass, in the logits' dtype.

    d/dz of each sum: s -> exp(z - m); z_label -> [c == y]; below_max -> -w[c] (kept
    logits only); then the soft-cap's slope 1 - tanh². m is the shift the sums were
    taken with, hit (...,) whether the label was a kept class of the block, and e
    (..., C) is exp(z - m) when saved by the forward, or None to recompute it here.
    """
    live = column(_live(ct))
    x = _constant_where_dead(live, logits.astype(compute_dtype(logits.dtype)))
    keep = None
    if e is None or smoothing or softcap is not None or logit_mask is not None:
        keep = x != -jnp.inf
        if logit_mask is not None:
            keep = keep & logit_mask
    z, slope = x, None
    if softcap is not None:
        t = jnp.tanh(jnp.where(keep, x, 0) / softcap)
        z, slope = softcap * t, 1 - t * t
    if e is None:
        e = jnp.exp(jnp.where(keep, z, -jnp.inf) - m[..., None])
    else:  # saved by the forward: its derivative comes with it
        e = _constant_where_dead(live, e)
    # A dropped logit has e = 0 and is never the label of a hit row, so without
    # smoothing, softcap or mask `keep` is not needed: the plain CPU case reads only e.
    ids = lax.broadcasted_iota(labels.dtype, (x.shape[-1],), 0) + offset
    dz = ct.s[..., None] * e
    is_label = (ids == labels[..., None]) & column(hit)
    dz = dz + jnp.where(is_label, ct.z_label[..., None], 0)
    if smoothing:
        w = 1 if class_weights is None else class_weights.astype(x.dtype)
        dz = dz - ct.below_max[..., None] * w
    if slope is not None:
        dz = dz * slope
    if keep is not None:
        dz = jnp.where(keep, dz, 0)
    return _zero_where_dead(live, dz).astype(logits.dtype)


_logit_partial.defvjp(_logit_partial_fwd, _logit_partial_bwd)


def rescale(p, m_old: jax.Array, m_new: jax.Array):
    """Re-express sums (`Partial` or `SoftPartial`) taken with shift m_old in terms of
    shift m_new (online lse): s scales by exp(m_old - m_new); each Σ a (m - z) grows by
    (m_new - m_old) Σ a.

    A row with nothing kept yet has s = 0 and the placeholder shift 0, from which
    exp(0 - m_new) overflows for m_new < -88: s stays 0 there instead of 0 * inf = NaN.
    """
    moved = dict(s=jnp.where(p.s == 0, 0, p.s * jnp.exp(m_old - m_new)))
    for below, total in (("below_max", "kw_sum"), ("wt_below", "wt_sum")):
        if getattr(p, below, None) is not None:
            moved[below] = getattr(p, below) + (m_new - m_old) * getattr(p, total)
    return p._replace(**moved)


def online_add(total, best, block_best, block_sums):
    """One step of the online log-sum-exp over blocks of classes: the running max grows
    to include `block_best`, the running sums `total` (`Partial`/`SoftPartial`) move to
    the new shift, and `block_sums(m)` — the block's sums at shift m — is added.
    Returns (total, new best)."""
    new_best = jnp.maximum(best, block_best)
    m = safe_shift(new_best)
    moved = rescale(total, safe_shift(best), m)
    return jax.tree.map(jnp.add, moved, block_sums(m)), new_best


def psum_partial(p, vocab_axis_name):
    return p if vocab_axis_name is None else jax.tree.map(lambda a: lax.psum(a, vocab_axis_name), p)


def option_in(option, dtype):
    """A scheduled (array) option in the loss's compute dtype: a float64 schedule must
    not turn a float32 loss into float64. Static (Python float) options pass as they are."""
    return option if isinstance(option, float) else jnp.asarray(option).astype(dtype)


def is_off(option) -> bool:
    """A static option value of exactly 0.0 switches its term off at trace time."""
    return isinstance(option, float) and option == 0.0


# What the statistics of a dropped position become before the loss is formed: values
# that keep every intermediate finite (lse 0, nll 0), so the backward multiplies no
# zero cotangent by an inf or NaN.
_NEUTRAL = {"s": 1, "label_hits": 1, "w_label": 1, "count": 1}


def _without_dropped(p, best, position_mask):
    """(p, best, lse as seen) with the rows that `position_mask` drops replaced by
    neutral values: their logits may hold anything (NaN padding rows too), and their
    gradient must still be exactly 0 (the selects pass them a zero cotangent, no 0 *
    NaN). `lse as seen` is the log-sum-exp of the original statistics, for aux only."""
    seen = lax.stop_gradient(lse_from_sum(p.s, safe_shift(best)))
    if position_mask is None:
        return p, best, seen
    neutral = {
        k: None if v is None else jnp.where(position_mask, v, _NEUTRAL.get(k, 0))
        for k, v in p._asdict().items()
    }
    return p._replace(**neutral), jnp.where(position_mask, best, 0), seen


def _row_lse(s, best, position_mask):
    """(m, valid, lse) of whole-row sums: the shift, v_n before label checks (a row
    keeping no logit is dropped; NaN rows count as kept, so NaN propagates), and the
    log-sum-exp zeroed where invalid (keeps the inf/NaN of dropped rows out of
    gradients)."""
    m = safe_shift(best)
    valid = ~jnp.isneginf(best)
    if position_mask is not None:
        valid = valid & position_mask
    return m, valid, jnp.where(valid, lse_from_sum(s, m), 0)


def poisoned(bad, value, loss):
    """`loss` where not `bad`, else NaN — and a NaN gradient into `value` (something
    the logits' gradient flows through, e.g. the loss itself) there.

    For a scheduled option out of range (it poisons every position): a plain
    `where(bad, nan, loss)` has a zero gradient at `bad`, the loss would be NaN but the
    gradients finite, and a training step's guard on non-finite gradients
    (`optax.apply_if_finite`, loss scaling) would let the update through. The added
    term is 0 (exactly, even for an infinite `value`) where not `bad`, and its
    gradient there is 0 · cotangent; plain arithmetic, so forward mode (jvp, Hessians)
    works too. (Not for bad labels: the NaN gradient would not depend on the
    cotangent, so a padding position discarded after reduction="none" would still
    poison the step.)
    """
    nan_where_bad = jnp.where(bad, jnp.nan, 0)
    v = jnp.where(bad, value, 0)
    return jnp.where(bad, jnp.nan, loss) + (v - lax.stop_gradient(v)) * nan_where_bad


def _smoothing_in_range(loss, label_smoothing):
    """A scheduled (array) ε outside [0, 1] cannot be caught at trace time: NaN, not a
    wrong loss."""
    return poisoned((label_smoothing < 0) | (label_smoothing > 1), loss, loss)


def _z_loss_term(z_loss, weight, lse, like):
    """z_loss · weight · lse² (NaN for a scheduled negative coefficient); zeros when off."""
    if is_off(z_loss):
        return jnp.zeros_like(like)
    term = z_loss * weight * lse**2
    return poisoned(z_loss < 0, lse, term)


def kept_positions(labels, position_mask, ignore_index):
    """The positions neither `position_mask` nor `ignore_index` drops (None: all)."""
    if ignore_index is None:
        return position_mask
    keep = labels != ignore_index
    return keep if position_mask is None else position_mask & keep


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
    dtype = p.s.dtype
    label_smoothing, z_loss = (option_in(v, dtype) for v in (label_smoothing, z_loss))
    position_mask = kept_positions(labels, position_mask, ignore_index)
    p, best, lse_seen = _without_dropped(p, best, position_mask)
    m, valid, lse = _row_lse(p.s, best, position_mask)
    w_label = jnp.ones(labels.shape, dtype) if p.w_label is None else p.w_label

    nll = jnp.where(p.label_hits > 0, lse - p.z_label, jnp.inf)
    label_coef = (1 - label_smoothing) * w_label
    # 0 * inf counts as 0 (a zero label weight, or ε = 1, on a dropped label logit);
    # only a non-finite nll is replaced, so at ε = 1 the loss still has its ε-derivative.
    loss = label_coef * jnp.where((label_coef == 0) & ~jnp.isfinite(nll), 0, nll)
    if not is_off(label_smoothing):
        smooth = ((lse - m) * p.kw_sum + p.below_max) / jnp.maximum(p.count, 1)
        loss = _smoothing_in_range(loss + label_smoothing * smooth, label_smoothing)
    zl = _z_loss_term(z_loss, w_label, lse, loss)
    loss = loss + zl

    weight = jnp.where(valid, w_label, 0)
    in_range = (labels >= 0) & (labels < num_classes)
    loss = jnp.where(valid, loss, 0)
    # A bad label's NaN keeps a finite gradient (as optax's does): padding labels out of
    # range, masked after reduction="none" with `jnp.where`, must still train.
    loss = jnp.where(valid & ~in_range, jnp.nan, loss)
    correct = None if first is None else jnp.where(lax.stop_gradient(first) == labels, weight, 0)
    return Rows(loss, lse_seen, jnp.where(valid, zl, 0), valid, weight, correct)


def prepared_max(logits, logit_mask, softcap, offset, with_argmax):
    """(best, first, z): `row_max` of the prepared logits, best in the compute dtype, and
    the array it was taken on (None when not formed). Without softcap or mask that is
    the logits themselves (the max is exact in any dtype): no float32 copy is formed."""
    dtype = compute_dtype(logits.dtype)
    if softcap is not None and not with_argmax:
        # The soft-cap is increasing: cap the max instead of every logit (equal to
        # rounding; the max is only the shift of the log-sum-exp). Then the capped
        # logits are formed for the sums alone, and XLA:GPU fuses them there instead of
        # materialising a float32 logits-sized array shared by the max and the sums.
        x = logits if logit_mask is None else jnp.where(logit_mask, logits, -jnp.inf)
        raw = jnp.max(x, axis=-1).astype(dtype)
        return jnp.where(raw == -jnp.inf, raw, apply_softcap(raw, softcap)), None, None
    plain = softcap is None and logit_mask is None
    z = logits if plain else prepare_logits(logits, logit_mask, softcap)
    best, first = row_max(z, offset, with_argmax)
    return best.astype(dtype), first, z


def logit_stats(
    logits, labels, offset, class_weights, logit_mask, *, softcap, smoothing, with_argmax,
    one_pass_backward=True,
):  # fmt: skip
    """This shard's row statistics in two reads of the logits (XLA): the row max, then
    the sums at that shift. The Pallas kernel (`jaxent.pallas.row_stats`) has this
    signature and these results, in one read, as has XLA's one-read reduction run in
    its place (`jaxent._one_read`).

    Shapes: logits (..., C) any floating dtype, labels (...,) global class ids, offset
    the global id of column 0, class_weights (C,) or None, logit_mask (..., C) or None.
    Returns (`Partial` taken with shift safe_shift(best), best (...,) the row max of
    the prepared logits, first (...,) the global id of its first occurrence or None).

    `one_pass_backward=False` leaves the sums to plain autodiff instead of
    `logit_partial`'s `custom_vjp`: for a forward pass inside a `custom_vjp`'s own
    forward rule, never differentiated in reverse mode but in forward mode when second
    derivatives are taken, which a `custom_vjp` does not allow.
    """
    best, first, _ = prepared_max(logits, logit_mask, softcap, offset, with_argmax)
    m = safe_shift(best)
    if one_pass_backward:
        partial = logit_partial(
            logits, labels, offset, m, class_weights, logit_mask, softcap, smoothing, apart=True
        )
    else:
        z = prepare_logits(logits, logit_mask, softcap)
        partial = block_partial(z, labels, offset, lax.stop_gradient(m), class_weights, smoothing)
        # Batched under `jax.vmap` as `logit_partial`'s are (see `stacked`): a
        # `custom_vjp` whose forward rule uses one and its primal the other needs both
        # to batch their outputs alike.
        partial = unstacked(jax.tree.structure(partial), stacked(partial))
    return partial, best, first


# `logit_stats` for a forward pass inside a `custom_vjp`'s forward rule (see above).
forward_logit_stats = functools.partial(logit_stats, one_pass_backward=False)


def combine_shards(partial: Partial, best, first, vocab_axis_name, position_mask=None):
    """Whole-row statistics from each vocab shard's: the largest max (and its first
    occurrence) wins; each shard's sums are moved to that shift and summed.

    Rows that `position_mask` drops are not differentiated through the exchange: their
    statistics may be NaN (padding), and the move's derivative there, exp(NaN), times
    their zero cotangent would make their gradient NaN instead of 0."""
    if vocab_axis_name is None:
        return partial, best, first
    if position_mask is not None:
        partial, best = jax.tree.map(
            lambda v: jnp.where(position_mask, v, lax.stop_gradient(v)), (partial, best)
        )
    local = safe_shift(best)
    best, first = shard_max(best, first, vocab_axis_name)
    partial = rescale(partial, local, safe_shift(best))
    return psum_partial(partial, vocab_axis_name), best, first


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
    stats=logit_stats,
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
    logits of 1e30. Computed in three steps shared with `linear_cross_entropy`: the
    shard's row statistics (`stats`: `logit_stats`, or the Pallas kernel with the same
    signature), `combine_shards`, `finish_rows`.
    """
    num_local = logits.shape[-1]
    offset = class_offset(num_local, vocab_axis_name)
    local = stats(
        logits,
        labels,
        offset,
        class_weights,
        logit_mask,
        softcap=softcap,
        smoothing=not is_off(label_smoothing),
        with_argmax=with_argmax,
    )
    keep = kept_positions(labels, position_mask, ignore_index)
    partial, best, first = combine_shards(*local, vocab_axis_name, keep)
    return finish_rows(
        partial,
        best,
        first,
        labels,
        num_classes_global(num_local, vocab_axis_name),
        position_mask=keep,
        ignore_index=None,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )


class SoftPartial(NamedTuple):
    """Additive per-row sums of probability targets t over a block of classes, all
    taken with one shift m (the soft counterpart of `Partial`); smoothing is applied
    when the row is finished, from the sums of `class_sums`:

    s: Σ_keep e^(z-m); wt_sum: Σ_keep w t; wt_below: Σ_keep w t (m - z);
    lost: Σ_drop [w t != 0] (target mass on dropped logits; NaN for a NaN target there,
    `lost_mass`); kw_sum, below_max, count
    as in `Partial` (with smoothing only).
    """

    s: jax.Array
    wt_sum: jax.Array
    wt_below: jax.Array
    lost: jax.Array
    kw_sum: jax.Array | None = None
    below_max: jax.Array | None = None
    count: jax.Array | None = None


def soft_sums(z, t, m, w, smoothing: bool, e=None) -> SoftPartial:
    """`SoftPartial` of prepared logits z (..., C), float targets t (..., C), shift m
    (...,) and class weights w (C,) or None. Elementwise ops and row sums only: the
    Pallas kernel runs this same code on each tile."""
    base = class_sums(z, m, w, smoothing, e)
    keep = kept(z)
    kwt, lost = target_terms(keep, t, w)
    return SoftPartial(
        s=base.s,
        wt_sum=jnp.sum(kwt, axis=-1),
        wt_below=jnp.sum(jnp.where(keep, kwt * (m[..., None] - z), 0), axis=-1),
        lost=jnp.sum(lost, axis=-1),
        kw_sum=base.kw_sum,
        below_max=base.below_max,
        count=base.count,
    )


def lost_mass(keep, wt):
    """Per logit, whether a dropped one (not `keep`) is asked to hold target mass
    (w t != 0), as 1.0 / 0.0 — NaN for a NaN target there, so that the row's loss is
    NaN, as NaN targets at kept logits make it, rather than +inf."""
    dropped = jnp.where(jnp.isnan(wt), jnp.nan, (wt != 0).astype(wt.dtype))
    return jnp.where(keep, 0, dropped)


def soft_partial(logits, targets, m, class_weights, logit_mask, softcap, smoothing):
    """`soft_sums(prepare_logits(logits, ...), targets, ...)` with a backward that writes
    the gradients of the logits and of the targets in one elementwise pass (`soft_grad`);
    exp(z - m) is saved on CPU and recomputed elsewhere, apart (`logit_partial`): its
    logits are always an input of the loss."""
    args = (logits, targets, lax.stop_gradient(m), class_weights, logit_mask)
    return _exp_saved_on_cpu(_soft_partial, _soft_sums, softcap, smoothing, args, apart=True)


def _soft_sums(softcap, smoothing, logits, targets, m, class_weights, logit_mask):
    """(`SoftPartial` of the raw logits, exp(z - m))."""
    z, e = _prepared_exp(logits, m, logit_mask, softcap)
    w = None if class_weights is None else class_weights.astype(z.dtype)
    return soft_sums(z, targets.astype(z.dtype), m, w, smoothing, e), e


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _soft_partial(softcap, smoothing, exp, fields, *args):
    return stacked(_soft_sums(softcap, smoothing, *args)[0])


def _soft_partial_fwd(softcap, smoothing, exp, fields, *args):
    out, e = _soft_sums(softcap, smoothing, *args)
    return stacked(out), (*args, e if exp == "saved" else None)


def _soft_partial_bwd(softcap, smoothing, exp, fields, residuals, ct):
    logits, targets, m, class_weights, logit_mask, e = residuals
    if exp == "recomputed apart":
        logits, logit_mask = _own_copy(logits, logit_mask)
    grads = soft_grad(unstacked(fields, ct), logits, targets, m, class_weights, logit_mask,
                      softcap, smoothing, e)  # fmt: skip
    return *grads, None, None, None


_soft_partial.defvjp(_soft_partial_fwd, _soft_partial_bwd)


def soft_grad(
    ct: SoftPartial, logits, targets, m, class_weights, logit_mask, softcap, smoothing, e
):
    """Gradients of Σ ct · SoftPartial for the logits and the targets, one elementwise
    pass, each in its input's dtype. Kept logits only:

        d/dz: ct.s e^(z-m) - ct.wt_below w t - ct.below_max w, times the soft-cap's slope
        d/dt: w (ct.wt_sum + ct.wt_below (m - z))

    `e` is exp(z - m) when saved by the forward, or None to recompute it here.
    """
    live = column(_live(ct))
    x = _constant_where_dead(live, logits.astype(compute_dtype(logits.dtype)))
    targets = _constant_where_dead(live, targets)
    keep = x != -jnp.inf
    if logit_mask is not None:
        keep = keep & logit_mask
    z, slope = jnp.where(keep, x, 0), None  # finite everywhere: no inf * 0 below
    if softcap is not None:
        t_cap = jnp.tanh(z / softcap)
        z, slope = softcap * t_cap, 1 - t_cap * t_cap
    if e is None:
        e = jnp.exp(jnp.where(keep, z, -jnp.inf) - m[..., None])
    else:  # saved by the forward: its derivative comes with it
        e = _constant_where_dead(live, e)
    w = 1 if class_weights is None else class_weights.astype(x.dtype)
    t = targets.astype(x.dtype)
    dz = ct.s[..., None] * e - ct.wt_below[..., None] * w * t
    if smoothing:
        dz = dz - ct.below_max[..., None] * w
    if slope is not None:
        dz = dz * slope
    dt = w * (ct.wt_sum[..., None] + ct.wt_below[..., None] * (m[..., None] - z))
    zero = jnp.zeros((), x.dtype)
    return (
        jnp.where(keep, _zero_where_dead(live, dz), zero).astype(logits.dtype),
        jnp.where(keep, _zero_where_dead(live, dt), zero).astype(targets.dtype),
    )


def soft_stats(
    logits, targets, offset, class_weights, logit_mask, *, softcap, smoothing, with_argmax
):
    """This shard's statistics for probability targets (XLA), in the shapes of
    `logit_stats`: (`SoftPartial` at shift safe_shift(best), best, first, target_best,
    target_first) — the row max of the prepared logits, and the row max of the targets
    at kept logits, each with the global id of its first occurrence; first,
    target_best and target_first are None without `with_argmax`. The Pallas kernel
    (`jaxent.pallas.row_stats.kernel_soft_stats`) has this signature, in one read."""
    best, first, z = prepared_max(logits, logit_mask, softcap, offset, with_argmax)
    target_best = target_first = None
    if with_argmax:
        top = jnp.where(kept(z), targets.astype(best.dtype), -jnp.inf)
        target_best, target_first = row_max(top, offset)
    partial = soft_partial(logits, targets, safe_shift(best), class_weights, logit_mask,
                           softcap, smoothing)  # fmt: skip
    return partial, best, first, target_best, target_first


def combine_soft_shards(
    partial, best, first, target_best, target_first, vocab_axis_name, position_mask=None
):
    """`combine_shards` for `soft_stats`: also the targets' argmax across shards."""
    partial, best, first = combine_shards(partial, best, first, vocab_axis_name, position_mask)
    if target_first is not None:
        target_best, target_first = shard_max(target_best, target_first, vocab_axis_name)
    return partial, best, first, target_first


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
    stats=soft_stats,
) -> Rows:
    """Per-position cross-entropy with probability targets (SPEC §2), class axis last.

    Shapes: logits and targets (..., C); masks and weights as in `categorical_rows`.

        t'[n,c] = (1-ε) t[n,c] + ε/C_n          (ε/C_n on kept logits only)
        l_n     = v_n * (-Σ_c w[c] t'[n,c] lp[n,c] + z_loss * lse_n²)

    evaluated from the sums of `SoftPartial` as (lse - m) Σ_keep w t' + Σ_keep w t' (m - z)
    (two non-negative terms for non-negative targets), with Σ w t' = (1-ε) Σ w t +
    (ε/C_n) Σ w and likewise for Σ w t' (m - z). A dropped logit with zero target
    contributes 0 (0 * -inf = 0); one with a non-zero target makes the loss +inf.
    `weight` is v_n (mean over valid positions) and `correct` is [argmax z == argmax t].
    `stats` computes the shard's sums: `soft_stats`, or the Pallas kernel.
    """
    smoothing = not is_off(label_smoothing)
    offset = class_offset(logits.shape[-1], vocab_axis_name)
    local = stats(logits, targets, offset, class_weights, logit_mask,
                  softcap=softcap, smoothing=smoothing, with_argmax=with_argmax)  # fmt: skip
    p, best, first, target_first = combine_soft_shards(*local, vocab_axis_name, position_mask)
    label_smoothing, z_loss = (option_in(v, p.s.dtype) for v in (label_smoothing, z_loss))
    p, best, lse_seen = _without_dropped(p, best, position_mask)
    m, valid, lse = _row_lse(p.s, best, position_mask)
    mass, below, lost = p.wt_sum, p.wt_below, p.lost > 0
    if smoothing:
        share = label_smoothing / jnp.maximum(p.count, 1)
        mass = (1 - label_smoothing) * mass + share * p.kw_sum
        below = (1 - label_smoothing) * below + share * p.below_max
        lost = lost & (label_smoothing != 1)  # dropped logits keep (1-ε) t
    loss = jnp.where(lost, jnp.inf, (lse - m) * mass + below)
    loss = jnp.where(jnp.isnan(p.lost), jnp.nan, loss)  # a NaN target on a dropped logit
    if smoothing:
        loss = _smoothing_in_range(loss, label_smoothing)
    zl = _z_loss_term(z_loss, 1, lse, loss)
    loss = loss + zl

    weight = valid.astype(loss.dtype)
    correct = None
    if with_argmax:
        same = lax.stop_gradient(first == target_first)
        correct = jnp.where(same, weight, 0)
    return Rows(
        jnp.where(valid, loss, 0), lse_seen, jnp.where(valid, zl, 0), valid, weight, correct
    )
