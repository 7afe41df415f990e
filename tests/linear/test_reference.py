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
