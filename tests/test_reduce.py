"""jaxent._reduce: reductions and the safe mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import _reduce


def test_safe_divide_by_zero_is_zero_with_zero_gradient():
    value, grad = jax.value_and_grad(lambda a: _reduce.safe_divide(a, 0.0))(3.0)
    assert value == 0 and grad == 0
    np.testing.assert_allclose(_reduce.safe_divide(3.0, 4.0), 0.75)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reduce_loss_matches_numpy(reduction):
    rng = np.random.default_rng(0)
    loss = rng.normal(size=(3, 4)).astype(np.float32)
    weight = rng.uniform(size=(3, 4)).astype(np.float32)
    got = _reduce.reduce_loss(jnp.asarray(loss), jnp.asarray(weight), reduction)
    want = {"none": loss, "sum": loss.sum(), "mean": loss.sum() / weight.sum()}[reduction]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mean_over_zero_valid_positions_is_zero_with_zero_gradient():
    valid = jnp.zeros(5, bool)
    value, grad = jax.value_and_grad(
        lambda a: _reduce.reduce_loss(a, jnp.zeros(5), "mean", valid=valid)
    )(jnp.arange(5.0))
    assert value == 0 and not grad.any()
    assert _reduce.reduce_loss(jnp.zeros(5), jnp.zeros(5), "mean") == 0  # valid: weight != 0


def test_mean_of_valid_positions_with_zero_weight_divides_by_zero():
    """SPEC's mean is Σ l / Σ v w[y]: only zero *valid* positions are special."""
    valid = jnp.ones(3, bool)
    assert jnp.isnan(_reduce.reduce_loss(jnp.zeros(3), jnp.zeros(3), "mean", valid=valid))
    assert _reduce.reduce_loss(jnp.ones(3), jnp.zeros(3), "mean", valid=valid) == jnp.inf
    assert jnp.isnan(_reduce.reduce_loss(jnp.full(3, jnp.nan), jnp.zeros(3), "mean", valid=valid))
