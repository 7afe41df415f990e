"""Row statistics of categorical logits in one read, in XLA: a variadic reduction.

`_stable.logit_stats` reads the logits twice in the forward pass: the row max, then the
sums of `Partial` at that shift. Here one `lax.reduce` carries the max and the sums
together, its combiner being the online log-sum-exp (`_stable.rescale` for two partial
results), so XLA reads the logits once: compiled for an H100 or a TPU v5p, forward +
backward of `cross_entropy` moves 3 logits-sized arrays instead of 4
(`python -m benchmarks.deviceless`). Each element enters as its own one-class result:

    m = z,  s = e^(z - z) = 1 (0 for a dropped logit, NaN for +inf),
    totals Σ b = b,  shifted sums Σ b (m - z) = 0,  plain sums as given

and two results (m1, s1, ...), (m2, s2, ...) combine with hi = max(m1, m2),
lo = min(m1, m2), gap = hi - lo (0 when the lower one has nothing kept):

    m = hi,  s = s_hi + s_lo e^(-gap),  Σ b (m - z) adds both + gap Σ_lo b,  totals add

One exponential per element, as in the second read of the two-read form; a NaN
anywhere makes m, s and so the row NaN, as there.

Where it serves (`pallas.row_stats.platform_stats`): XLA on accelerators other than
CUDA (where the Triton kernel serves), through the same custom derivatives as the
kernel (`row_stats.Config.xla`). CPU keeps the two reads: its elementwise loops are
compute-bound and its backward reuses the forward's saved exp (`_stable.logit_partial`).
The argmax (`return_aux`) is a second reduction, as in `_stable.row_max`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._stable import (
    Partial,
    SoftPartial,
    kept,
    kept_weights,
    prepare_logits,
    row_max,
    target_terms,
)


def online_reduce(z, s, weighted: dict, plain: dict):
    """(best, s, {name: (Σ b, Σ b (best - z))}, {name: Σ p}) over the last axis of the
    prepared logits z (..., C) in one variadic reduction: s is each element's e^(z - z)
    (1 kept, 0 dropped), `weighted` maps names to elementwise weights b (zero where
    dropped), `plain` to elementwise values p. All arrays broadcast to z's shape."""
    names, plains = list(weighted), list(plain)
    k = len(names)
    dtype = z.dtype

    def full(a):
        return jnp.broadcast_to(jnp.asarray(a, dtype), z.shape)

    zeros = jnp.zeros(z.shape, dtype)
    operands = (
        (z, full(s))
        + tuple(full(weighted[n]) for n in names)
        + (zeros,) * k
        + tuple(full(plain[n]) for n in plains)
    )
    identity = (-jnp.inf, 0.0) + (0.0,) * (2 * k + len(plains))
    init = tuple(jnp.asarray(v, dtype) for v in identity)

    def combine(a, b):
        m1, s1, t1, below1, p1 = _split(a, k)
        m2, s2, t2, below2, p2 = _split(b, k)
        hi, lo = jnp.maximum(m1, m2), jnp.minimum(m1, m2)
        first_hi = m1 >= m2  # False when either is NaN: then e is NaN, and so is s
        gap = jnp.where(lo == -jnp.inf, 0, hi - lo)  # the lower one holds no mass
        e = jnp.exp(-gap)
        s = jnp.where(first_hi, s1 + s2 * e, s2 + s1 * e)
        totals = tuple(x + y for x, y in zip(t1, t2, strict=True))
        belows = tuple(
            u + v + gap * jnp.where(first_hi, y, x)
            for u, v, x, y in zip(below1, below2, t1, t2, strict=True)
        )
        sums = tuple(x + y for x, y in zip(p1, p2, strict=True))
        return (hi, s, *totals, *belows, *sums)

    out = lax.reduce(operands, init, combine, (z.ndim - 1,))
    best, s, totals, belows, sums = _split(out, k)
    pairs = {n: (t, b) for n, t, b in zip(names, totals, belows, strict=True)}
    return best, s, pairs, dict(zip(plains, sums, strict=True))


def _split(values, k: int):
    """(m, s, totals, belows, plain sums) of a flat tuple of carried values."""
    return values[0], values[1], values[2 : 2 + k], values[2 + k : 2 + 2 * k], values[2 + 2 * k :]


def rows(x, t, mask, weights, *, softcap, smoothing: bool, with_argmax: bool):
    """The results of the row-statistics kernel (`pallas.row_stats.Out`, as a tuple
    (best, first, sums, target_best, target_first)) for logits x (N, C), targets t
    (N, C) or None, mask (N, C) or None and float32 weights (C,) or None; the sums at
    shift safe_shift(best), label fields None, as `_stable.class_sums` /
    `_stable.soft_sums` give them."""
    z = prepare_logits(x, mask, softcap)
    keep = kept(z)
    s = jnp.where(z == jnp.inf, jnp.nan, keep.astype(z.dtype))
    weighted, plain = {}, {}
    if smoothing:
        weighted["kw"] = kept_weights(keep, weights, z.dtype)
        plain["count"] = keep
    if t is not None:
        weighted["wt"], plain["lost"] = target_terms(keep, t.astype(z.dtype), weights)
    best, s, pairs, totals = online_reduce(z, s, weighted, plain)
    extra = {}
    if smoothing:
        extra = dict(kw_sum=pairs["kw"][0], below_max=pairs["kw"][1], count=totals["count"])
    first = row_max(z, 0)[1] if with_argmax else None
    if t is None:
        return best, first, Partial(s=s, z_label=None, label_hits=None, **extra), None, None
    sums = SoftPartial(
        s=s, wt_sum=pairs["wt"][0], wt_below=pairs["wt"][1], lost=totals["lost"], **extra
    )
    target_best = target_first = None
    if with_argmax:
        target_best, target_first = row_max(jnp.where(keep, t.astype(z.dtype), -jnp.inf), 0)
    return best, first, sums, target_best, target_first


__all__ = ["online_reduce", "rows"]
