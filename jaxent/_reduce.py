"""Reductions: "none" / "sum" / "mean", valid counts, sums across a batch mesh axis.

"mean" divides the sum of per-position losses by the sum of their weights
(Σ_n v_n w[y_n], PyTorch's weighted mean). A mean over zero weight is 0 with zero
gradients, never NaN. With `batch_axis_name`, both sums run over the whole mesh
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


def reduce_loss(
    per_position: jax.Array, weight: jax.Array, reduction: str, batch_axis_name=None
) -> jax.Array:
    """Reduce per-position values; `weight` is the per-position denominator share."""
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return global_sum(per_position, batch_axis_name)
    # Both sums in one reduction (and one psum across devices): fewer, larger ops. No
    # reshape: flattening a sharded array would make XLA gather it.
    both = jnp.stack(
        [per_position, jnp.broadcast_to(weight, per_position.shape).astype(per_position.dtype)]
    )
    total, weight_sum = global_sum(both, batch_axis_name, axis=tuple(range(1, both.ndim)))
    return safe_divide(total, weight_sum)
