"""Reductions: "none" / "sum" / "mean", valid counts, sums across a batch mesh axis.

"mean" divides the sum of per-position losses by the sum of their weights
(Σ_n v_n w[y_n], PyTorch's weighted mean). A mean over zero valid positions is 0 with
zero gradients, never NaN; valid positions whose weights sum to 0 divide by 0, as the
formula (and PyTorch) does. With `batch_axis_name`, the sums run over the whole mesh
axis, so a sharded batch gives the single-device result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def global_sum(x: jax.Array, batch_axis_name=None, axis=None) -> jax.Array:
    """Σ of x (over `axis`, default all elements), over every shard of
    `batch_axis_name` too."""
    total = jnp.sum(x, axis=axis)
    return total if batch_axis_name is None else lax.psum(total, batch_axis_name)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 (with zero gradient) where denominator == 0."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def weighted_mean(total: jax.Array, weight_sum: jax.Array, count: jax.Array) -> jax.Array:
    """total / weight_sum; 0 with zero gradient when no position is valid (count == 0).

    Only the count decides: a weight sum of 0 over valid positions (labels whose class
    weight is 0, or out of range, whose weight is unknown) divides by 0 — NaN or inf,
    never a silently finite number.
    """
    return jnp.where(count > 0, total / jnp.where(count > 0, weight_sum, 1), 0)


def stacked_sums(arrays, batch_axis_name=None) -> jax.Array:
    """(len(arrays),) sums of equally shaped arrays, in the first one's dtype, in one
    reduction (and one psum across devices): fewer, larger ops. No reshape: flattening
    a sharded array would make XLA gather it."""
    like = arrays[0]
    both = jnp.stack([jnp.broadcast_to(a, like.shape).astype(like.dtype) for a in arrays])
    return global_sum(both, batch_axis_name, axis=tuple(range(1, both.ndim)))


def reduce_loss(
    per_position: jax.Array,
    weight: jax.Array,
    reduction: str,
    batch_axis_name=None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Reduce per-position values; `weight` is the per-position denominator share and
    `valid` (default: weight != 0) says which positions count for an empty mean."""
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return global_sum(per_position, batch_axis_name)
    extra = [] if valid is None else [valid]
    sums = stacked_sums([per_position, weight, *extra], batch_axis_name)
    return weighted_mean(sums[0], sums[1], sums[-1])  # the count: valid, else the weight
