"""kl_divergence against a float64 oracle (Hinton-style distillation, T²-scaled)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxent

from . import oracles

F32 = jnp.float32


def make(seed, shape=(3, 4, 6)):
    ks, kt = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(ks, shape, F32) * 2, jax.random.normal(kt, shape, F32) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_matches_oracle(temperature, reduction):
    s, t = make(0)
    got = jaxent.kl_divergence(s, t, temperature=temperature, reduction=reduction)
    want = oracles.kl_divergence(s, t, temperature=temperature, reduction=reduction)
    assert oracles.rel_err(got, want) < 1e-5


def test_matches_optax():
    s, t = make(1, (5, 7))
    want = optax.losses.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
    np.testing.assert_allclose(jaxent.kl_divergence(s, t, reduction="none"), want, rtol=1e-5)


def test_gradients_flow_to_both_and_match_finite_differences():
    s, t = make(2, (2, 5))
    s, t = s.astype(jnp.float64), t.astype(jnp.float64)
    check_grads(
        lambda a, b: jaxent.kl_divergence(a, b, temperature=2.0), (s, t), order=1, modes=["rev"]
    )
    gs, gt = jax.grad(lambda a, b: jaxent.kl_divergence(a, b), argnums=(0, 1))(s, t)
    assert np.any(gs != 0) and np.any(gt != 0)
    frozen = jax.grad(lambda b: jaxent.kl_divergence(s, jax.lax.stop_gradient(b)))(t)
    assert np.all(frozen == 0)


def test_minus_inf_targets_contribute_zero():
    s, t = make(3, (2, 5))
    t = t.at[0, 1].set(-jnp.inf)
    got, g = jax.value_and_grad(lambda a: jaxent.kl_divergence(a, t, reduction="sum"))(s)
    want = oracles.kl_divergence(s, t, reduction="sum")
    assert np.isfinite(got) and oracles.rel_err(got, want) < 1e-5
    assert np.all(np.isfinite(g))
    unreachable = jaxent.kl_divergence(s.at[1, 0].set(-jnp.inf), t, reduction="none")
    assert unreachable[1] == np.inf


def test_minus_inf_teacher_logit_is_a_removed_class_for_both_gradients():
    """A -inf teacher logit (with a -inf student logit there too) is the same as
    deleting that class: loss and both gradients equal those of the smaller row, and
    the dropped entries get exactly zero gradient (never NaN)."""
    s, t = make(5, (1, 5))
    kept = [0, 2, 3, 4]
    t_inf, s_inf = t.at[0, 1].set(-jnp.inf), s.at[0, 1].set(-jnp.inf)
    grad = jax.value_and_grad(lambda a, b: jaxent.kl_divergence(a, b), argnums=(0, 1))
    got, (gs, gt) = grad(s_inf, t_inf)
    want, (ws, wt) = grad(s[:, kept], t[:, kept])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(gs[:, kept], ws, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gt[:, kept], wt, rtol=1e-5, atol=1e-7)
    assert gs[0, 1] == 0 and gt[0, 1] == 0


def test_where_positions_and_self_divergence():
    s, t = make(4, (4, 5))
    mask = jnp.array([True, False, True, False])
    got = jaxent.kl_divergence(s, t, where=mask)
    want = oracles.kl_divergence(s, t, where=mask)
    assert oracles.rel_err(got, want) < 1e-5
    np.testing.assert_allclose(jaxent.kl_divergence(s, s, reduction="none"), 0, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        jaxent.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match="`target_logits` must have shape"):
        jaxent.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


@pytest.mark.parametrize("padding", [np.nan, np.inf])
def test_dropped_positions_have_zero_gradient_whatever_they_hold(padding):
    """Padding rows dropped by a positions `where` may hold NaN or inf: their loss is 0
    and both gradients exactly 0 there (masking only the result gave 0 * NaN), and the
    kept rows' gradients are those of the kept rows alone."""
    k = jax.random.split(jax.random.PRNGKey(11), 2)
    s = jax.random.normal(k[0], (4, 6), F32)
    t = jax.random.normal(k[1], (4, 6), F32)
    keep = jnp.array([True, False, True, False])
    s_pad, t_pad = s.at[1].set(padding).at[3, 2].set(padding), t.at[1].set(padding)

    def total(a, b, where=keep):
        return jaxent.kl_divergence(a, b, where=where, temperature=2.0, reduction="sum")

    loss, grads = jax.value_and_grad(total, argnums=(0, 1))(s_pad, t_pad)
    rows = jnp.array([0, 2])
    want, want_grads = jax.value_and_grad(total, argnums=(0, 1))(s[rows], t[rows], None)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    for g, gw in zip(grads, want_grads, strict=True):
        np.testing.assert_array_equal(g[~keep], 0)
        np.testing.assert_allclose(g[rows], gw, rtol=1e-6, atol=1e-7)
