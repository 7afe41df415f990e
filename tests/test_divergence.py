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
    x = jnp.zeros((2, 3))
    # None is not a temperature: the messages must not offer it.
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got 0.0"):
        jaxent.kl_divergence(x, x, temperature=0.0)
    with pytest.raises(TypeError, match=r"`temperature` must be a Python float > 0, got NoneType"):
        jaxent.kl_divergence(x, x, temperature=None)
    with pytest.raises(ValueError, match=r"broadcastable to the positions' shape \(2,\)"):
        jaxent.kl_divergence(x, x, where=jnp.ones((3,), bool))
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


def kl_oracle_with_grads(s, t, temperature):
    """Float64, from the formula: the mean over positions of T² KL(p ‖ q) and its
    gradients, p = softmax(t/T), q = softmax(s/T): d/ds = T (q - p) / N and
    d/dt = T p (log p - log q - KL) / N (KL per position, without the T²)."""
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lq, lp = log_softmax(s), log_softmax(t)
    p, q = np.exp(lp), np.exp(lq)
    kl = np.sum(p * (lp - lq), axis=-1, keepdims=True)
    n = kl.size
    loss = temperature**2 * kl.mean()
    return loss, temperature * (q - p) / n, temperature * p * (lp - lq - kl) / n


def precision_cases(shape=(16, 256)):
    """Independent logits; a close student (the distillation regime) with the two sets
    of logits offset by 1000 and -500; a sharply peaked teacher (log p/q up to ~60)."""
    k = jax.random.split(jax.random.PRNGKey(31), 3)
    a, b, c = (jax.random.normal(key, shape, F32) for key in k)
    return {
        "independent": (2 * a, 2 * b),
        "close, offset": (2 * a + 1000, 2 * a + 0.3 * b - 500),
        "peaked teacher": (a, 10 * c),
    }


@pytest.mark.parametrize("temperature", [1.0, 20.0, 100.0, 1000.0])
def test_float32_precision_at_any_temperature(temperature):
    """The divergence shrinks like 1/T² while log p and log q do not: summing
    p (log p - log q) loses ~T² of the float32 precision (per position 3e-5 at T=20 and
    6e-2 at T=1000; ~1 at T=1000 with offset logits). Non-negative terms q φ(log p/q)
    lose nothing: measured <= 2e-7 for the loss, <= 1e-6 for the gradients, at every T."""
    for name, (s, t) in precision_cases().items():
        want, want_gs, want_gt = kl_oracle_with_grads(s, t, temperature)
        loss, (gs, gt) = jax.value_and_grad(
            lambda a, b: jaxent.kl_divergence(a, b, temperature=temperature), argnums=(0, 1)
        )(s, t)
        rows = jaxent.kl_divergence(s, t, temperature=temperature, reduction="none")
        want_rows = oracles.kl_divergence(s, t, temperature=temperature, reduction="none")
        assert oracles.rel_err(loss, want) < 1e-5, name
        assert oracles.rel_err(rows, want_rows) < 1e-5, name
        assert oracles.rel_err(gs, want_gs) < 1e-5, name
        assert oracles.rel_err(gt, want_gt) < 1e-5, name


def test_bfloat16_inputs_compute_in_float32():
    s, t = precision_cases((4, 64))["close, offset"]
    s, t = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
    loss, (gs, gt) = jax.value_and_grad(
        lambda a, b: jaxent.kl_divergence(a, b, temperature=100.0), argnums=(0, 1)
    )(s, t)
    want, want_gs, want_gt = kl_oracle_with_grads(s, t, 100.0)
    assert loss.dtype == F32 and gs.dtype == gt.dtype == jnp.bfloat16
    assert oracles.rel_err(loss, want) < 1e-5
    assert oracles.rel_err(gs, want_gs) < 1e-2 and oracles.rel_err(gt, want_gt) < 1e-2


@pytest.mark.parametrize("dtype", [F32, jnp.float64])
def test_phi_branches(dtype):
    """q φ(u), φ(u) = u e^u - e^u + 1, with q = 1, p = e^u: the series (|u| < 1/2),
    the closed form below and p (u - 1) + q above agree with a float64 reference across
    the switches, and the gradient is u e^u, finite even for huge |u|."""
    from jaxent._divergence import _q_phi

    u = np.concatenate([np.linspace(-4, 4, 8001), [-0.5, 0.5, -1e-6, 1e-6, 0.0, 30.0, 60.0]])
    k = np.arange(2, 30)
    coefficients = (k - 1) / np.cumprod(np.arange(1, 30))[1:]
    series = np.sum(coefficients * u[:, None] ** k, axis=-1)
    want = np.where(np.abs(u) < 1, series, u * np.exp(u) - np.expm1(u))
    u_in = jnp.asarray(u, dtype)
    got = _q_phi(u_in, jnp.exp(u_in), jnp.ones_like(u_in))
    tol = 2e-6 if dtype == F32 else 1e-14
    np.testing.assert_allclose(got, want, rtol=tol, atol=0)
    grad = jax.vmap(jax.grad(lambda v: _q_phi(v, jnp.exp(v), jnp.ones_like(v))))(u_in)
    np.testing.assert_allclose(grad, u * np.exp(u), rtol=10 * tol, atol=10 * tol)
    huge = jnp.asarray([-1e30, 1e30], dtype)
    g = jax.grad(lambda v: jnp.sum(_q_phi(v, jnp.zeros_like(v), jnp.zeros_like(v))))(huge)
    assert np.all(np.isfinite(g))


def test_a_teacher_row_with_nothing_kept_is_dropped_also_under_where():
    """An all -inf teacher row has no distribution: it is dropped (0, not counted in
    the mean) with a positions `where` as without one — float64 NumPy KL."""
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    t[1] = -np.inf
    where = np.array([True, True, True, False])
    got = jaxent.kl_divergence(jnp.asarray(x), jnp.asarray(t), where=jnp.asarray(where))
    np.testing.assert_allclose(got, oracles.kl_divergence(x, t, where=where), rtol=1e-10)
    each = jaxent.kl_divergence(jnp.asarray(x), jnp.asarray(t), where=jnp.asarray(where),
                                reduction="none")  # fmt: skip
    assert each[1] == 0 and each[3] == 0


def test_a_student_row_with_nothing_kept_is_inf_with_a_finite_gradient_elsewhere():
    """An all -inf student row: its KL is +inf; masked out afterwards, its gradient is
    exactly 0 (not 0/0 = NaN), and the other rows' is softmax(x) - softmax(t)."""
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    x[1] = -np.inf
    keep = jnp.array([True, False, True])

    def masked(a):
        each = jaxent.kl_divergence(a, jnp.asarray(t), reduction="none")
        return jnp.sum(jnp.where(keep, each, 0))

    assert jaxent.kl_divergence(jnp.asarray(x), jnp.asarray(t), reduction="none")[1] == np.inf
    g = np.asarray(jax.grad(masked)(jnp.asarray(x)))
    assert (g[1] == 0).all()
    for i in (0, 2):
        want = np.exp(x[i]) / np.exp(x[i]).sum() - np.exp(t[i]) / np.exp(t[i]).sum()
        np.testing.assert_allclose(g[i], want, rtol=1e-10, atol=1e-14)
