"""binary_cross_entropy and focal_loss against float64 oracles (PyTorch / torchvision)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxent

from . import oracles

F32 = jnp.float32


def make(seed, shape=(4, 5), scale=3.0, dtype=F32):
    kx, kt = jax.random.split(jax.random.PRNGKey(seed))
    x = (jax.random.normal(kx, shape, F32) * scale).astype(dtype)
    t = (jax.random.uniform(kt, shape) > 0.5).astype(F32)
    return x, t


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_smoothing": 0.1},
        {"pos_weight": "vector"},
        {"weights": "full"},
        {"where": "mask", "pos_weight": "vector", "label_smoothing": 0.2},
    ],
)
def test_bce_matches_oracle(reduction, opts):
    x, t = make(0)
    opts = dict(opts)
    if opts.get("pos_weight") == "vector":
        opts["pos_weight"] = jnp.linspace(0.5, 3.0, 5)
    if opts.get("weights") == "full":
        opts["weights"] = jax.random.uniform(jax.random.PRNGKey(1), (4, 5))
    if opts.get("where") == "mask":
        opts["where"] = jax.random.uniform(jax.random.PRNGKey(2), (4, 5)) > 0.4
    got = jaxent.binary_cross_entropy(x, t, reduction=reduction, **opts)
    want = oracles.binary_cross_entropy(x, t, reduction=reduction, **opts)
    assert got.dtype == F32
    assert oracles.rel_err(got, want) < 1e-5


def test_bce_matches_optax_and_gradient():
    x, t = make(3)
    np.testing.assert_allclose(
        jaxent.binary_cross_entropy(x, t, reduction="none"),
        optax.losses.sigmoid_binary_cross_entropy(x, t),
        rtol=1e-5,
    )
    g = jax.grad(lambda x: jaxent.binary_cross_entropy(x, t, reduction="sum"))(x)
    np.testing.assert_allclose(g, jax.nn.sigmoid(x) - t, rtol=1e-5, atol=1e-7)


def test_saturated_logits_and_low_precision():
    x = jnp.array([-1e4, -100.0, 0.0, 100.0, 1e4], jnp.bfloat16)
    t = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
    loss, g = jax.value_and_grad(lambda x: jaxent.binary_cross_entropy(x, t, reduction="sum"))(x)
    want = oracles.binary_cross_entropy(np.asarray(x.astype(F32)), t, reduction="sum")
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(g.astype(F32)))
    assert oracles.rel_err(loss, want) < 1e-3


def test_float64_schedule_keeps_a_float32_loss():
    x, t = make(7)
    loss = jaxent.binary_cross_entropy(x, t, label_smoothing=jnp.float64(0.1))
    assert loss.dtype == jnp.float32
    want = jaxent.binary_cross_entropy(x, t, label_smoothing=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.25, None, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_focal_matches_oracle(alpha, gamma, reduction):
    x, t = make(4)
    got = jaxent.focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    want = oracles.focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    assert oracles.rel_err(got, want) < 1e-5


def test_focal_matches_optax():
    x, t = make(5)
    np.testing.assert_allclose(
        jaxent.focal_loss(x, t, reduction="none"),
        optax.losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("gamma", [0.3, 2.0])
def test_focal_gradients_finite_when_saturated(gamma):
    x = jnp.array([-200.0, -30.0, 0.0, 30.0, 200.0], F32)
    for t in (jnp.ones(5), jnp.zeros(5), jnp.full(5, 0.3)):
        g = jax.grad(lambda x, t=t: jaxent.focal_loss(x, t, gamma=gamma, reduction="sum"))(x)
        assert np.all(np.isfinite(g))


def test_focal_gradient_matches_finite_differences():
    x, t = make(6, shape=(6,), scale=2.0, dtype=jnp.float64)
    check_grads(lambda x: jaxent.focal_loss(x, t, gamma=1.5), (x,), order=1, modes=["rev"])


# Every sign of infinity against every kind of target: certain and right, certain and
# wrong, and a soft target.
INF_X = np.array([np.inf, -np.inf, np.inf, -np.inf, np.inf, -np.inf])
INF_T = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3])


def _limits(pos_weight=1.0, alpha=None, gamma=0.0):
    """Loss and gradient at x = ±inf from the formulas: σ(x) is 1 or 0; a term whose
    target mass is 0 costs 0, any other costs +inf; the gradient is α_t (1-p_t)^γ (σ-t)."""
    sig = (INF_X > 0).astype(float)
    wrong = np.where(sig == 1, 1 - INF_T, pos_weight * INF_T)
    loss = np.where(wrong > 0, np.inf, 0.0)
    p_t = sig * INF_T + (1 - sig) * (1 - INF_T)
    alpha_t = 1.0 if alpha is None else alpha * INF_T + (1 - alpha) * (1 - INF_T)
    return loss, alpha_t * (1 - p_t) ** gamma * (sig - INF_T)


@pytest.mark.parametrize("pos_weight", [None, 2.0])
def test_bce_infinite_logits_are_their_limits(pos_weight):
    """Not NaN (PyTorch and optax give inf - inf there)."""
    x, t = jnp.asarray(INF_X, F32), jnp.asarray(INF_T, F32)
    opts = {} if pos_weight is None else {"pos_weight": jnp.full(6, pos_weight)}
    loss, g = jax.value_and_grad(
        lambda x: jaxent.binary_cross_entropy(x, t, reduction="none", **opts).sum()
    )(x)
    p = 1.0 if pos_weight is None else pos_weight
    want_loss, _ = _limits(p)
    each = jaxent.binary_cross_entropy(x, t, reduction="none", **opts)
    np.testing.assert_array_equal(each, want_loss)
    assert loss == np.inf
    # d/dx [p t softplus(-x) + (1-t) softplus(x)] = (1-t) σ(x) - p t σ(-x)
    np.testing.assert_allclose(g, np.where(INF_X > 0, 1 - INF_T, -p * INF_T), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.25, None])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_infinite_logits_are_their_limits(alpha, gamma):
    x, t = jnp.asarray(INF_X, F32), jnp.asarray(INF_T, F32)
    each = jaxent.focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
    g = jax.grad(lambda x: jaxent.focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum"))(x)
    want_loss, want_g = _limits(alpha=alpha, gamma=gamma)
    np.testing.assert_array_equal(each, want_loss)
    np.testing.assert_allclose(g, want_g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pos_weight", [None, 0.0, 2.0])
def test_bce_gradient_in_targets_and_pos_weight(pos_weight):
    """d/dt [p t softplus(-x) + (1-t) softplus(x)] = p softplus(-x) - softplus(x), also at
    t = 0 and t = 1 (a saturated teacher's σ); d/dp = t softplus(-x), also at p = 0."""
    x = jnp.array([0.5, -1.0, 2.0, 4.0, -3.0, 0.0])
    t = jnp.array([0.0, 1.0, 0.5, 1.0, 0.0, 1.0])
    p = jnp.full(6, 1.0 if pos_weight is None else pos_weight)
    opts = {} if pos_weight is None else {"pos_weight": p}
    g_t = jax.grad(lambda t: jaxent.binary_cross_entropy(x, t, reduction="sum", **opts))(t)
    sp_pos, sp_neg = np.logaddexp(0, np.asarray(x, float)), np.logaddexp(0, -np.asarray(x, float))
    np.testing.assert_allclose(g_t, np.asarray(p) * sp_neg - sp_pos, rtol=1e-6, atol=1e-7)
    if pos_weight is not None:
        g_p = jax.grad(lambda p: jaxent.binary_cross_entropy(x, t, pos_weight=p, reduction="sum"))(
            p
        )
        np.testing.assert_allclose(g_p, np.asarray(t) * sp_neg, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_in_targets_matches_the_oracle(gamma):
    """Central differences of the float64 oracle, also at t = 0 and t = 1, where the
    chain rule through log(1 - p_t) meets 0·inf."""
    x = np.array([0.5, -1.0, 2.0, 3.0, -2.5, 0.0])
    t = np.array([0.0, 1.0, 0.5, 1.0, 0.0, 0.3])
    got = jax.grad(lambda t: jaxent.focal_loss(x, t, gamma=gamma, reduction="sum"))(
        jnp.asarray(t, F32)
    )
    h = 1e-6
    want = [
        (
            oracles.focal_loss(x, t + h * e, gamma=gamma, reduction="sum")
            - oracles.focal_loss(x, t - h * e, gamma=gamma, reduction="sum")
        )
        / (2 * h)
        for e in np.eye(6)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_focal_second_derivatives_match_finite_differences():
    x, t = make(8, shape=(6,), scale=2.0, dtype=jnp.float64)
    t = t.astype(jnp.float64)
    check_grads(lambda x: jaxent.focal_loss(x, t, gamma=1.5), (x,), order=2, modes=["rev"])


def test_gradients_at_zero_logits():
    """σ(0) - t, and focal's from the oracle: at x = 0 a softplus written with max and
    |x| has derivative 0 in JAX (a zero-initialised head would not train)."""
    x, t = jnp.zeros(3, F32), jnp.array([0.0, 0.3, 1.0], F32)
    g = jax.grad(lambda x: jaxent.binary_cross_entropy(x, t, reduction="sum"))(x)
    np.testing.assert_allclose(g, [0.5, 0.2, -0.5], rtol=1e-6)
    g = jax.grad(lambda x: jaxent.focal_loss(x, t, reduction="sum"))(x)
    h = 1e-6
    want = [
        (
            oracles.focal_loss(h * e, t, reduction="sum")
            - oracles.focal_loss(-h * e, t, reduction="sum")
        )
        / (2 * h)
        for e in np.eye(3)
    ]
    np.testing.assert_allclose(g, want, rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_focal_target_gradient_of_confident_right_predictions_is_finite(gamma):
    """(1 - p_t)^(γ-1) overflows float32 where the BCE term ce underflows: no NaN from
    inf · 0. The exact d/dt (f ce) = f' ce + f ce' in float64, with 1 - p_t = ce =
    σ(-|x|) here; f' ce, γ/|x| of the total, is what the float32 path drops (< 0.5%)."""
    x = jnp.array([-105.0, -100.0, 105.0, 100.0], F32)
    t = jnp.array([0.0, 0.0, 1.0, 1.0], F32)
    g = jax.grad(lambda t: jaxent.focal_loss(x, t, gamma=gamma, alpha=None, reduction="sum"))(t)
    xs = np.asarray(x, np.float64)
    gap = np.exp(-np.abs(xs))  # σ(-|x|) to float64 precision; also ce
    want = gamma * gap ** (gamma - 1) * -np.sign(xs) * gap + gap**gamma * -xs
    np.testing.assert_allclose(g, want, rtol=5e-3)


def test_bce_certain_and_right_has_no_cancellation():
    """t = 1, x = 40: the loss is softplus(-40) ≈ 4.2e-18, not softplus(40) - 40 = 0."""
    loss = jaxent.binary_cross_entropy(jnp.array([40.0]), jnp.array([1.0]), reduction="none")
    want = oracles.binary_cross_entropy(np.array([40.0]), np.array([1.0]), reduction="none")
    assert oracles.rel_err(loss, want) < 1e-5 and loss[0] > 0


def test_where_drops_elements_and_their_gradients():
    x, t = make(7)
    x = x.at[0, 0].set(jnp.nan)
    mask = jnp.ones((4, 5), bool).at[0, 0].set(False)
    loss, g = jax.value_and_grad(lambda x: jaxent.binary_cross_entropy(x, t, where=mask))(x)
    assert np.isfinite(loss) and g[0, 0] == 0 and np.all(np.isfinite(g))
    empty = jaxent.focal_loss(x, t, where=jnp.zeros((4, 5), bool))
    assert empty == 0


@pytest.mark.parametrize(
    ("fn", "kwargs", "error", "match"),
    [
        (jaxent.binary_cross_entropy, {"targets": jnp.zeros(3)}, ValueError, "`targets` must"),
        (jaxent.binary_cross_entropy, {"pos_weight": jnp.ones(4)}, ValueError, "`pos_weight`"),
        (jaxent.binary_cross_entropy, {"label_smoothing": 2.0}, ValueError, "`label_smoothing`"),
        (jaxent.binary_cross_entropy, {"reduction": "x"}, ValueError, "`reduction` must be"),
        (jaxent.focal_loss, {"gamma": -1.0}, ValueError, "`gamma` must be >= 0"),
        (jaxent.focal_loss, {"alpha": 2.0}, ValueError, "`alpha` must be <= 1"),
        (jaxent.focal_loss, {"where": jnp.ones(5, int)}, TypeError, "`where` must be a boolean"),
    ],
)
def test_errors_name_the_argument(fn, kwargs, error, match):
    args = {"logits": jnp.zeros((2, 5)), "targets": jnp.zeros((2, 5))}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fn(args.pop("logits"), args.pop("targets"), **args)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize(("x", "t"), [(0.7, 0.0), (0.7, 1.0), (-1.3, 0.0), (0.7, 0.3)])
def test_focal_hessian_in_logits_and_targets_at_hard_targets(gamma, x, t):
    """Second derivatives in (x, t) jointly, hard targets included: the mixed ones
    agree with each other and with the float64 oracle's second differences (one-sided
    in t, which must stay in [0, 1]). The t-derivative of log(1 - p_t) at t = 0 or 1
    must not come through the guard on log t (it did: d²/dx dt and d²/dt² were off)."""
    with jax.enable_x64(True):
        xs, ts = jnp.array([x], jnp.float64), jnp.array([t], jnp.float64)

        def loss(x, t):
            return jaxent.focal_loss(x, t, alpha=0.25, gamma=gamma, reduction="sum")

        h = jax.hessian(loss, (0, 1))(xs, ts)

    def f(a, b):
        return float(oracles.focal_loss([a], [b], alpha=0.25, gamma=gamma, reduction="sum"))

    e, k = 1e-4, 1e-4 if t < 0.5 else -1e-4  # t steps into [0, 1]

    def dx(b):  # central in x
        return (f(x + e, b) - f(x - e, b)) / (2 * e)

    def t_at(i):
        return t + i * k

    # Second-order one-sided differences in t.
    xx = (f(x + e, t) - 2 * f(x, t) + f(x - e, t)) / e**2
    xt = (-3 * dx(t) + 4 * dx(t_at(1)) - dx(t_at(2))) / (2 * k)
    tt = (2 * f(x, t) - 5 * f(x, t_at(1)) + 4 * f(x, t_at(2)) - f(x, t_at(3))) / k**2
    got = [float(h[0][0][0, 0]), float(h[0][1][0, 0]), float(h[1][0][0, 0]), float(h[1][1][0, 0])]
    np.testing.assert_allclose(got, [xx, xt, xt, tt], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
@pytest.mark.parametrize(("x", "t"), [(100.0, 1.0), (-100.0, 0.0), (100.0, 0.0)])
def test_focal_hessian_finite_for_confident_predictions(gamma, x, t):
    """1 / (1 - p_t) in the derivative of log(1 - p_t) is capped: for γ >= 1 the
    Hessian in (x, t) of a confident prediction is finite, not NaN from inf times a
    zero tangent; for γ = 2 and a right one every entry is ~0 (1 - p_t ~ e^-100)."""
    xs, ts = jnp.array([x], jnp.float32), jnp.array([t], jnp.float32)  # |x| > 88: capped
    h = jax.hessian(lambda x, t: jaxent.focal_loss(x, t, gamma=gamma, reduction="sum"), (0, 1))
    entries = np.array([float(a[0, 0]) for row in h(xs, ts) for a in row])
    assert np.all(np.isfinite(entries))
    if gamma == 2.0 and (x > 0) == (t > 0.5):
        assert np.all(np.abs(entries) < 1e-30)


def test_focal_alpha_zero_weights_only_the_negatives():
    """alpha in [0, 1] is on (only None or < 0 turns it off): alpha = 0 gives the
    positive term weight 0 and the negative term weight 1 — float64 NumPy."""
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(4, 5)) * 2, rng.uniform(size=(4, 5))
    want = oracles.focal_loss(x, t, alpha=0.0, gamma=2.0, reduction="none")
    got = jaxent.focal_loss(jnp.asarray(x), jnp.asarray(t), alpha=0.0, gamma=2.0, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_traced_label_smoothing_out_of_range_is_nan_on_either_side():
    """A scheduled ε outside [0, 1] (below as well as above) makes the loss and its
    gradient NaN; ε = 0.1 is t' = 0.9 t + 0.05 (float64 NumPy)."""
    rng = np.random.default_rng(1)
    x, t = jnp.asarray(rng.normal(size=(4, 3)), F32), jnp.asarray(rng.uniform(size=(4, 3)), F32)

    def f(z, eps):
        return jaxent.binary_cross_entropy(z, t, label_smoothing=eps)

    for eps in (-0.1, 1.1):
        assert np.isnan(f(x, jnp.float32(eps))), eps
        assert np.isnan(jax.grad(f)(x, jnp.float32(eps))).all(), eps
    want = oracles.binary_cross_entropy(x, t, label_smoothing=0.1)
    np.testing.assert_allclose(f(x, jnp.float32(0.1)), want, rtol=1e-6)
