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


def global_sum(x: jax.Array, batch_axis_name=None) -> jax.Array:
    """Σ of all elements of x, over every shard of `batch_axis_name` too."""
    total = jnp.sum(x)
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
    total = global_sum(per_position, batch_axis_name)
    if reduction == "sum":
        return total
    return safe_divide(total, global_sum(weight, batch_axis_name))
