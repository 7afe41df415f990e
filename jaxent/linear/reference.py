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


def gradient_dtype(matmul_dtype) -> jnp.dtype:
    """The dtype a block's logit gradient is written in for the dx and dw matmuls: the
    matmul dtype (bf16 tensor cores), except float16. A gradient already scaled by its
    cotangent — 1/N for a mean — is ~p/N per logit, and float16's 5-bit exponent makes
    that subnormal, precision gone, for N in the tens of thousands (dx and dw 2e-2
    from the float64 truth at N=65536); float32 there. bfloat16 has float32's exponent."""
    dtype = jnp.dtype(matmul_dtype)
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


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
