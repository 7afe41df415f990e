"""The materialised reference: logits = x @ w.T + bias, then `cross_entropy`.

This is the oracle the fused implementations are tested against. It holds the full
(N, V) float32 logits and their gradient, so it is only for small shapes or as a
baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._categorical import finish
from .._stable import categorical_rows, compute_dtype


def logits_dtype(x: jax.Array, w: jax.Array):
    """The dtype of `project`'s logits, and of every implementation's accumulators:
    float32, or float64 when x or w is."""
    return compute_dtype(jnp.result_type(x.dtype, w.dtype))


def project(x: jax.Array, w: jax.Array, bias: jax.Array | None) -> jax.Array:
    """(..., D) @ (V, D)^T (+ bias) -> (..., V) logits, accumulated in float32.

    The matmul is fed in the inputs' dtype (bf16 tensor cores) and only its result
    is float32, as in every implementation.
    """
    acc = logits_dtype(x, w)
    logits = jnp.einsum("...d,vd->...v", x, w, preferred_element_type=acc)
    return logits if bias is None else logits + bias.astype(acc)


def linear_cross_entropy_xla(
    x,
    w,
    labels,
    *,
    bias,
    logit_mask,
    position_mask,
    options,
    reduction,
    return_aux,
    batch_axis_name,
):
    """`cross_entropy(x @ w.T + bias, labels, ...)` with the logits materialised."""
    rows = categorical_rows(
        project(x, w, bias),
        labels,
        logit_mask=logit_mask,
        position_mask=position_mask,
        with_argmax=return_aux,
        **options,
    )
    return finish(rows, reduction, return_aux, batch_axis_name)
