"""The "xla" reference of linear_cross_entropy against float64 NumPy: §1 on x @ w.T + b."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

from .. import oracles


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_reference_matches_numpy_float64(reduction):
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (6, 5), jnp.float32)
    w = jax.random.normal(kw, (11, 5), jnp.float32)
    labels = jax.random.randint(ky, (6,), 0, 11)
    bias = jnp.linspace(-1, 1, 11, dtype=jnp.float32)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, class_weights=jnp.linspace(1, 2, 11))
    got = jaxent.linear_cross_entropy(
        x, w, labels, bias=bias, reduction=reduction, implementation="xla", **opts
    )
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(bias)
    want = oracles.cross_entropy(logits, labels, reduction=reduction, **opts)[0]
    assert oracles.rel_err(got, want) < 1e-5


def test_bfloat16_products_are_accumulated_in_float32():
    """`project` on bf16 inputs: float32 logits within float32 rounding of the float64
    product of the same bf16 values (a bf16 accumulation, then a cast, is ~1e-3 off).
    Run eagerly: under jit XLA:CPU folds such a cast into the dot and would hide it."""
    from jaxent.linear.reference import project

    kx, kw = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.normal(kx, (64, 32), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (100, 32), jnp.float32) * 0.5).astype(jnp.bfloat16)
    logits = project(x, w, None)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    assert logits.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(logits, np.float64) - want) / (1 + np.abs(want))) < 1e-5
