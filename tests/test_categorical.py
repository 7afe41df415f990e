"""cross_entropy and soft_cross_entropy against float64 oracles written from SPEC §1–§2."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxent

from . import oracles

F32 = jnp.float32


def make(seed, shape, num_classes, dtype=F32, scale=2.0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    logits = (jax.random.normal(kx, shape + (num_classes,), jnp.float32) * scale).astype(dtype)
    labels = jax.random.randint(ky, shape, 0, num_classes, jnp.int32)
    return logits, labels


def weights_for(num_classes, seed=11):
    return jax.random.uniform(jax.random.PRNGKey(seed), (num_classes,), F32, 0.2, 2.0)


OPTIONS = {
    "plain": {},
    "weights": {"class_weights": True},
    "smoothing": {"label_smoothing": 0.2},
    "zloss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "ignore": {"ignore_index": 1},
    "all": {
        "class_weights": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 4.0,
        "ignore_index": 2,
    },
}


def resolve(opts, num_classes):
    opts = dict(opts)
    if opts.get("class_weights") is True:
        opts["class_weights"] = weights_for(num_classes)
    return opts


def where_for(kind, logits, labels, seed=5):
    if kind is None:
        return None
    shape = labels.shape if kind == "positions" else logits.shape
    mask = jax.random.uniform(jax.random.PRNGKey(seed), shape) > 0.3
    if kind == "logits":  # keep every label's own logit so losses stay finite
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
        mask = mask | onehot
    return mask


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("where_kind", [None, "positions", "logits"])
def test_cross_entropy_matches_oracle(name, reduction, where_kind):
    logits, labels = make(0, (4, 6), 7)
    opts = resolve(OPTIONS[name], 7)
    where = where_for(where_kind, logits, labels)
    got, aux = jaxent.cross_entropy(
        logits, labels, where=where, reduction=reduction, return_aux=True, **opts
    )
    want, want_aux = oracles.cross_entropy(logits, labels, where=where, reduction=reduction, **opts)
    assert got.dtype == F32
    assert oracles.rel_err(got, want) < 1e-5
    assert oracles.rel_err(aux.z_loss, want_aux["z_loss"]) < 1e-5
    np.testing.assert_allclose(aux.accuracy, want_aux["accuracy"], rtol=1e-6)
    assert int(aux.num_valid) == want_aux["num_valid"]
    np.testing.assert_allclose(aux.weight_sum, want_aux["weight_sum"], rtol=1e-6)
    np.testing.assert_allclose(aux.lse, want_aux["lse"], rtol=1e-5)


def oracle_grad(fn, x, h=1e-6):
    """Central finite differences of a float64 NumPy oracle."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in itertools.product(*map(range, x.shape)):
        if not np.isfinite(x[idx]):
            continue
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (fn(up) - fn(down)) / (2 * h)
    return g


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("where_kind", [None, "logits"])
def test_cross_entropy_gradient_matches_oracle(name, where_kind):
    logits, labels = make(1, (5,), 6)
    logits = logits.at[0, 2].set(-jnp.inf)
    labels = labels.at[0].set(0)
    opts = resolve(OPTIONS[name], 6)
    where = where_for(where_kind, logits, labels)
    got = jax.grad(lambda x: jaxent.cross_entropy(x, labels, where=where, **opts))(logits)
    want = oracle_grad(lambda x: oracles.cross_entropy(x, labels, where=where, **opts)[0], logits)
    assert got.dtype == F32
    assert oracles.rel_err(got, want) < 1e-5
    assert got[0, 2] == 0  # a -inf logit gets no gradient
    if where is not None:
        assert np.all(np.asarray(got)[~np.asarray(where)] == 0)


def test_check_grads_float64():
    logits, labels = make(2, (3,), 5, dtype=jnp.float64)
    w = weights_for(5).astype(jnp.float64)

    def f(x):
        return jaxent.cross_entropy(
            x, labels, class_weights=w, label_smoothing=0.1, z_loss=0.01, softcap=3.0
        )

    check_grads(f, (logits,), order=2, modes=["rev"], eps=1e-4)
    assert f(logits).dtype == jnp.float64


def oracle_hvp(fn, x, v, h=1e-4):
    """Hessian-vector product of a float64 NumPy oracle by central differences of second
    order: (H v)_i = [f(x + h e_i + h v) - f(x + h e_i - h v) - f(x - h e_i + h v)
    + f(x - h e_i - h v)] / 4h^2."""
    x, v = np.asarray(x, np.float64), np.asarray(v, np.float64)
    hv = np.zeros_like(x)
    for idx in itertools.product(*map(range, x.shape)):
        e = np.zeros_like(x)
        e[idx] = h
        hv[idx] = (fn(x + e + h * v) - fn(x + e - h * v) - fn(x - e + h * v)
                   + fn(x - e - h * v)) / (4 * h * h)  # fmt: skip
    return hv


SECOND_ORDER = {
    "forward-over-reverse": lambda f, x, v: jax.jvp(jax.grad(f), (x,), (v,))[1],
    "reverse-over-reverse": lambda f, x, v: jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(x),
    "hessian": lambda f, x, v: jnp.tensordot(jax.hessian(f)(x), v, axes=v.ndim),
}


@pytest.mark.parametrize("mode", sorted(SECOND_ORDER))
@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy"])
def test_second_derivatives_match_oracle(loss, mode):
    """Hessian-vector products of the default path in float32. Its dispatch also traces
    the CUDA kernel branch (chosen at lowering), so that branch must be twice
    differentiable too."""
    logits, labels = make(23, (4,), 5)
    v = make(24, (4,), 5)[0]
    opts = dict(class_weights=weights_for(5), label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    if loss == "cross_entropy":
        labels = labels.at[1].set(-100)

        def f(x):
            return jaxent.cross_entropy(x, labels, ignore_index=-100, **opts)

        def want(x):
            return oracles.cross_entropy(x, labels, ignore_index=-100, **opts)[0]
    else:
        targets = jax.nn.softmax(make(25, (4,), 5)[0])

        def f(x):
            return jaxent.soft_cross_entropy(x, targets, **opts)

        def want(x):
            return oracles.soft_cross_entropy(x, targets, **opts)

    got = SECOND_ORDER[mode](f, logits, v)
    assert got.dtype == F32
    assert oracles.rel_err(got, oracle_hvp(want, logits, v)) < 1e-5


@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy"])
def test_second_derivatives_where_the_cotangent_is_zero(loss):
    """The backward zeroes non-finite gradient entries of rows with zero cotangent
    (dropped padding rows); that must not cut the gradient's derivative with respect to
    the cotangent. d/dλ grad(λ·L) at λ = 0 is grad(L); the Gauss-Newton Hessian of
    Σ (l_n - c_n)² at zero residual, 2 Jᵀ J, is optax's."""
    logits, labels = make(26, (4,), 5)
    targets = jax.nn.softmax(make(27, (4,), 5)[0])
    if loss == "cross_entropy":
        ours = functools.partial(jaxent.cross_entropy, labels=labels)
        theirs = functools.partial(optax.softmax_cross_entropy_with_integer_labels, labels=labels)
    else:
        ours = functools.partial(jaxent.soft_cross_entropy, targets=targets)
        theirs = functools.partial(optax.softmax_cross_entropy, labels=targets)
    opts = dict(label_smoothing=0.1, softcap=3.0)

    def scaled(x, lam):
        return lam * ours(x, **opts)

    mixed = jax.jacfwd(jax.grad(scaled), argnums=1)(logits, 0.0)
    reverse = jax.grad(lambda lam: jnp.vdot(jax.grad(scaled)(logits, lam), logits))(0.0)
    first = jax.grad(lambda x: ours(x, **opts))(logits)
    np.testing.assert_allclose(mixed, first, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reverse, jnp.vdot(first, logits), rtol=1e-5)
    assert float(jnp.max(jnp.abs(first))) > 0.01

    def residual(per_position):
        at = per_position(logits)
        return lambda x: jnp.sum((per_position(x) - at) ** 2)

    got = jax.hessian(residual(lambda x: ours(x, reduction="none")))(logits)
    want = jax.hessian(residual(theirs))(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(want))) > 0.1


@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy"])
@pytest.mark.parametrize("padding", [(1.0, np.inf), (1.0, np.nan), (np.inf, 1.0), (3e38, 1.0)])
def test_hessian_vector_products_ignore_dropped_rows(loss, padding):
    """A dropped (padding) row may hold anything, in its logits and in their tangent
    (an inf from a huge activation): the Hessian-vector product there is 0 and the
    other rows' are untouched, with smoothing and a soft-cap too."""
    logits, labels = make(30, (4,), 6)
    value, tangent = padding
    logits = logits.at[3].set(value)
    v = jnp.ones_like(logits).at[3].set(tangent)
    keep = jnp.array([True, True, True, False])
    targets = jax.nn.softmax(make(31, (4,), 6)[0])
    opts = dict(where=keep, label_smoothing=0.1, softcap=5.0)

    def f(x):
        if loss == "cross_entropy":
            return jaxent.cross_entropy(x, labels, **opts)
        return jaxent.soft_cross_entropy(x, targets, **opts)

    hv = jax.jvp(jax.grad(f), (logits,), (v,))[1]
    clean = jax.jvp(jax.grad(f), (logits.at[3].set(0.0),), (v.at[3].set(0.0),))[1]
    assert np.all(np.asarray(hv[3]) == 0)
    np.testing.assert_allclose(hv[:3], clean[:3], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy"])
def test_label_smoothing_gradient_at_one(loss):
    """At ε = 1 the label's share (1 - ε) w[y] nll is 0 but its ε-derivative is not
    (-w[y] nll): the float64 oracle's backward difference."""
    logits, labels = make(28, (5,), 6)
    targets = jax.nn.softmax(make(29, (5,), 6)[0])
    w = weights_for(6)
    if loss == "cross_entropy":

        def f(eps):
            return jaxent.cross_entropy(logits, labels, class_weights=w, label_smoothing=eps)

        def want(eps):
            return oracles.cross_entropy(logits, labels, class_weights=w, label_smoothing=eps)[0]
    else:

        def f(eps):
            return jaxent.soft_cross_entropy(logits, targets, class_weights=w, label_smoothing=eps)

        def want(eps):
            return oracles.soft_cross_entropy(logits, targets, class_weights=w, label_smoothing=eps)

    h = 1e-6
    slope = (want(1.0) - want(1.0 - h)) / h  # the loss is linear in ε
    assert oracles.rel_err(jax.grad(f)(jnp.float32(1.0)), slope) < 1e-4
    assert abs(slope) > 0.1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["plain", "all"])
def test_low_precision_inputs(dtype, name):
    logits, labels = make(3, (8,), 11, dtype=dtype)
    opts = resolve(OPTIONS[name], 11)
    loss, grad = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, labels, **opts))(logits)
    assert loss.dtype == F32 and grad.dtype == dtype
    rounded = np.asarray(logits.astype(F32), np.float64)  # the oracle sees the same inputs
    want = oracles.cross_entropy(rounded, labels, **opts)[0]
    want_grad = oracle_grad(lambda x: oracles.cross_entropy(x, labels, **opts)[0], rounded)
    assert oracles.rel_err(loss, want) < 1e-3
    assert oracles.rel_err(grad.astype(F32), want_grad) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_large_low_precision_logits_stay_finite(dtype):
    logits, labels = make(4, (6,), 9, dtype=dtype, scale=1e4)
    loss, grad = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, labels))(logits)
    want = oracles.cross_entropy(np.asarray(logits.astype(F32)), labels)[0]
    assert np.isfinite(loss) and np.all(np.isfinite(grad.astype(F32)))
    assert oracles.rel_err(loss, want) < 1e-3


def test_huge_float32_logits():
    logits = jnp.array([[1e30, -1e30, 0.0, 5e29], [3.0, 1e30, 1e30, -2.0]], F32)
    labels = jnp.array([3, 0])
    got = jaxent.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    want = oracles.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")[0]
    assert oracles.rel_err(got, want) < 1e-5


def test_float64_inputs_compute_in_float64():
    logits, labels = make(5, (4,), 6, dtype=jnp.float64)
    got = jaxent.cross_entropy(logits, labels, label_smoothing=0.3)
    assert got.dtype == jnp.float64
    assert (
        oracles.rel_err(got, oracles.cross_entropy(logits, labels, label_smoothing=0.3)[0]) < 1e-12
    )


@pytest.mark.parametrize("axis", [0, 1, -2])
def test_axis_and_leading_dims(axis):
    logits, labels = make(6, (2, 3), 5)  # (2, 3, 5), classes last
    moved = jnp.moveaxis(logits, -1, axis)
    got = jaxent.cross_entropy(moved, labels, axis=axis, label_smoothing=0.1, reduction="none")
    want = jaxent.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    mask = jnp.moveaxis(where_for("logits", logits, labels), -1, axis)
    got = jaxent.cross_entropy(moved, labels, axis=axis, where=mask)
    want = oracles.cross_entropy(logits, labels, where=jnp.moveaxis(mask, axis, -1))[0]
    assert oracles.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("shape", [(5, 3), (4, 4)])
def test_class_axis_first_with_targets_and_class_weights(shape):
    """axis=0, classes first (C, N): soft targets move with the logits, and class
    weights are (C,) of the class axis — float64 NumPy from the formulas; (4, 4), where
    C == N, would hide a wrong axis from every shape check."""
    c, n = shape
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    t = rng.random(size=shape)
    t /= t.sum(axis=0, keepdims=True)
    w = np.linspace(0.5, 2.0, c)
    labels = np.arange(n) * 2 % c
    f32 = functools.partial(jnp.asarray, dtype=F32)
    soft = jaxent.soft_cross_entropy(f32(x), f32(t), axis=0, class_weights=f32(w),
                                     reduction="none")  # fmt: skip
    want = oracles.soft_cross_entropy(x.T, t.T, class_weights=w, reduction="none")
    np.testing.assert_allclose(soft, want, rtol=1e-5)
    hard = jaxent.cross_entropy(f32(x), jnp.asarray(labels), axis=0, class_weights=f32(w))
    np.testing.assert_allclose(hard, oracles.cross_entropy(x.T, labels, class_weights=w)[0],
                               rtol=1e-5)  # fmt: skip


def test_matches_pytorch_semantics_weighted_ignore_smoothing():
    """F.cross_entropy(weight=w, ignore_index=-100, label_smoothing=ε), written out:
    loss_n = (1-ε) w[y] (-lp[y]) + ε/C Σ_c w[c] (-lp[c]); mean = Σ loss_n / Σ w[y_n]."""
    logits, labels = make(7, (6,), 4)
    labels = labels.at[2].set(-100)
    w = np.array([0.5, 1.0, 2.0, 1.5])
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64)))
    num = den = 0.0
    for n in range(6):
        y = int(labels[n])
        if y == -100:
            continue
        num += 0.9 * w[y] * -lp[n, y] + 0.1 / 4 * np.sum(w * -lp[n])
        den += w[y]
    got = jaxent.cross_entropy(
        logits, labels, class_weights=jnp.asarray(w, F32), ignore_index=-100, label_smoothing=0.1
    )
    np.testing.assert_allclose(got, num / den, rtol=1e-5)


def test_matches_optax():
    logits, labels = make(8, (10,), 13)
    got = jaxent.cross_entropy(logits, labels, reduction="none")
    want = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 13), 0.2)
    np.testing.assert_allclose(
        jaxent.cross_entropy(logits, labels, label_smoothing=0.2),
        optax.losses.softmax_cross_entropy(logits, targets).mean(),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        jaxent.soft_cross_entropy(logits, jax.nn.softmax(logits[::-1]), reduction="none"),
        optax.losses.softmax_cross_entropy(logits, jax.nn.softmax(logits[::-1])),
        rtol=1e-5,
    )


def test_jit_equals_eager_and_vmap_equals_loop():
    logits, labels = make(9, (3, 4), 6)
    w = weights_for(6)

    def f(x, y):
        return jaxent.cross_entropy(x, y, class_weights=w, label_smoothing=0.1)

    np.testing.assert_allclose(jax.jit(f)(logits, labels), f(logits, labels), rtol=1e-6)
    batched = jax.vmap(f)(logits, labels)
    looped = jnp.stack([f(logits[i], labels[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6)


@pytest.mark.parametrize("batched", ["labels", "targets", "class_weights"])
def test_grad_of_vmap_over_everything_but_the_logits_equals_loop(batched):
    """Shared logits, batched labels / targets / weights: the softmax term of the
    logits' gradient must be counted once per batch element, not once per element
    squared (each custom_vjp returns its sums as one array, batched as a whole)."""
    logits, labels = make(26, (4,), 6)
    many_labels = jax.random.randint(jax.random.PRNGKey(27), (3, 4), 0, 6)
    many_targets = jax.nn.softmax(make(28, (3, 4), 6)[0])
    many_weights = jax.random.uniform(jax.random.PRNGKey(29), (3, 6), F32, 0.5, 2.0)

    def loss(x, b):
        if batched == "targets":
            return jaxent.soft_cross_entropy(x, b, label_smoothing=0.1)
        if batched == "labels":
            return jaxent.cross_entropy(x, b, label_smoothing=0.1)
        return jaxent.cross_entropy(x, labels, class_weights=b, label_smoothing=0.1)

    batch = {"labels": many_labels, "targets": many_targets, "class_weights": many_weights}
    batch = batch[batched]
    got = jax.grad(lambda x: jnp.sum(jax.vmap(loss, (None, 0))(x, batch)))(logits)
    want = sum(jax.grad(loss)(logits, b) for b in batch)
    assert oracles.rel_err(got, want) < 1e-6


def test_no_retrace_when_values_change():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, y, eps, zl):
        return jaxent.cross_entropy(x, y, label_smoothing=eps, z_loss=zl)

    for seed in range(3):
        logits, labels = make(seed, (4,), 5)
        step(logits, labels, jnp.float32(0.1 * seed), jnp.float32(1e-3 * seed))
    eager = [jaxent.cross_entropy(*make(s, (4,), 5), label_smoothing=0.1) for s in range(2)]
    assert all(np.isfinite(eager))


def test_scheduled_options_equal_static_ones():
    logits, labels = make(10, (5,), 6)
    static = jaxent.cross_entropy(logits, labels, label_smoothing=0.15, z_loss=0.01)
    traced = jax.jit(
        lambda e, z: jaxent.cross_entropy(logits, labels, label_smoothing=e, z_loss=z)
    )(0.15, 0.01)
    np.testing.assert_allclose(static, traced, rtol=1e-6)
    bad = jaxent.cross_entropy(logits, labels, label_smoothing=jnp.float32(1.5))
    assert np.isnan(bad)


def test_minus_inf_logits_are_dropped_logits():
    logits = jnp.array([[0.0, 1.0, -jnp.inf, 2.0]], F32)
    labels = jnp.array([1])
    got = jaxent.cross_entropy(logits, labels, label_smoothing=0.3)
    want = oracles.cross_entropy(logits, labels, label_smoothing=0.3)[0]  # C = 3
    assert oracles.rel_err(got, want) < 1e-6
    same = jaxent.cross_entropy(logits[:, [0, 1, 3]], labels, label_smoothing=0.3)
    np.testing.assert_allclose(got, same, rtol=1e-6)
    at_inf = jaxent.cross_entropy(logits, jnp.array([2]), reduction="none")
    assert at_inf[0] == np.inf


def test_fully_masked_and_empty():
    logits, labels = make(12, (4,), 3)
    loss, grad = jax.value_and_grad(
        lambda x: jaxent.cross_entropy(x, labels, where=jnp.zeros(4, bool))
    )(logits)
    assert loss == 0 and np.all(grad == 0)
    all_inf = jnp.full((2, 3), -jnp.inf, F32)
    loss, grad = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, jnp.zeros(2, int)))(all_inf)
    assert loss == 0 and np.all(grad == 0)
    empty, aux = jaxent.cross_entropy(jnp.zeros((0, 4), F32), jnp.zeros((0,), int), return_aux=True)
    assert empty == 0 and aux.num_valid == 0 and aux.accuracy == 0


def test_single_class():
    loss = jaxent.cross_entropy(jnp.ones((3, 1), F32), jnp.zeros(3, int), label_smoothing=0.5)
    assert loss == 0


def test_bad_label_is_nan_only_there():
    logits, labels = make(13, (4,), 5)
    labels = labels.at[1].set(5).at[3].set(-1)
    got = jaxent.cross_entropy(logits, labels, reduction="none", ignore_index=-1)
    got = np.asarray(got)
    assert np.isnan(got[1]) and np.all(np.isfinite(got[[0, 2, 3]])) and got[3] == 0
    assert np.isnan(jaxent.cross_entropy(logits, labels, ignore_index=-1))
    masked = jaxent.cross_entropy(logits, labels, where=jnp.array([True, False, True, False]))
    assert np.isfinite(masked)  # dropped positions are not checked


def test_nan_logits_propagate():
    logits = jnp.array([[0.0, jnp.nan], [1.0, 2.0]], F32)
    got = jaxent.cross_entropy(logits, jnp.array([0, 1]), reduction="none")
    assert np.isnan(got[0]) and np.isfinite(got[1])
    masked = jaxent.cross_entropy(
        logits, jnp.array([0, 1]), where=jnp.array([[True, False], [True, True]])
    )
    assert np.isfinite(masked)  # a masked NaN takes no part


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_non_finite_logits_at_dropped_positions_get_exactly_zero_gradient(bad, smoothing):
    """Padding rows may hold anything (NaN from a fully masked attention row): a dropped
    position's loss is 0 and its gradient exactly 0, for every way of dropping it and
    for the Pallas kernel too; NaN in a kept row still propagates."""
    logits, labels = make(21, (4,), 5)
    logits = logits.at[1].set(bad).at[3, 2].set(bad)
    labels = labels.at[1].set(-100)
    ways = [
        dict(ignore_index=-100, where=jnp.array([True, True, True, False])),
        dict(where=jnp.array([True, False, True, False]), softcap=4.0, z_loss=1e-3),
    ]
    clean = logits.at[1].set(0.0).at[3].set(0.0)
    for kw, impl in itertools.product(ways, ["xla", "pallas"]):

        def loss(x, kw=kw, impl=impl):
            opts = dict(label_smoothing=smoothing, implementation=impl, **kw)
            return jaxent.cross_entropy(x, labels, **opts)

        with jaxent.pallas.interpret_mode():
            value, grad = jax.value_and_grad(loss)(logits)
            want_value, want = jax.value_and_grad(loss)(clean)
        np.testing.assert_allclose(value, want_value, rtol=1e-6)
        np.testing.assert_array_equal(grad[jnp.array([1, 3])], 0)
        np.testing.assert_allclose(grad, want, rtol=1e-6)
    kept = jax.grad(lambda x: jaxent.cross_entropy(x, labels.at[1].set(0)))(logits)
    assert bool(jnp.isnan(kept[1]).all() if bad != -jnp.inf else jnp.isfinite(kept[1]).all())
    targets = jax.nn.softmax(make(22, (4,), 5)[0])
    mask = jnp.array([True, False, True, False])

    def soft(x, t):
        return jaxent.soft_cross_entropy(x, t, where=mask, label_smoothing=smoothing)

    grads = jax.grad(soft, argnums=(0, 1))(logits, targets)
    for g in grads:
        np.testing.assert_array_equal(g[~mask], 0)


def test_mean_with_weights_divides_by_the_weight_sum_of_valid_positions():
    """Only zero valid positions give the 0 mean: out-of-range labels (weight unknown)
    stay NaN with class weights too, and valid positions whose label weights are all 0
    divide by 0 as PyTorch does."""
    logits, labels = make(23, (3,), 4)
    weights = jnp.array([0.0, 0.0, 0.0, 1.0], F32)
    bad = jnp.array([7, -1, -100])
    assert np.isnan(jaxent.cross_entropy(logits, bad, ignore_index=-100, class_weights=weights))
    zero = jnp.array([0, 1, 2])
    assert np.isnan(jaxent.cross_entropy(logits, zero, class_weights=weights))
    smoothed = jaxent.cross_entropy(logits, zero, class_weights=weights, label_smoothing=0.2)
    assert smoothed == jnp.inf
    empty = jaxent.cross_entropy(logits, zero, class_weights=weights, where=jnp.zeros(3, bool))
    assert empty == 0


# --- properties ------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 5), st.integers(1, 7))


@settings(max_examples=15, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), shift=st.floats(-50, 50))
def test_properties(shape, seed, shift):
    n, c = shape
    logits, labels = make(seed, (n,), c)
    loss, grad = jax.value_and_grad(lambda x: jaxent.cross_entropy(x, labels, reduction="sum"))(
        logits
    )
    assert loss >= 0
    shifted = jaxent.cross_entropy(logits + shift, labels, reduction="sum")
    np.testing.assert_allclose(shifted, loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad.sum(axis=-1), 0, atol=1e-5)
    soft = jaxent.soft_cross_entropy(logits, jax.nn.one_hot(labels, c), reduction="sum")
    np.testing.assert_allclose(soft, loss, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0, 1))
def test_masked_positions_get_exactly_zero_gradient(seed, eps):
    logits, labels = make(seed, (6,), 4)
    mask = jax.random.uniform(jax.random.PRNGKey(seed + 1), (6,)) > 0.5
    grad = jax.grad(lambda x: jaxent.cross_entropy(x, labels, where=mask, label_smoothing=eps))(
        logits
    )
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)


# --- soft_cross_entropy ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "opts",
    [{}, {"label_smoothing": 0.2}, {"z_loss": 0.01, "softcap": 3.0}, {"class_weights": True}],
)
@pytest.mark.parametrize("where_kind", [None, "positions", "logits"])
def test_soft_cross_entropy_matches_oracle(reduction, opts, where_kind):
    logits, labels = make(14, (3, 4), 6)
    targets = jax.nn.softmax(make(15, (3, 4), 6)[0])
    where = where_for(where_kind, logits, labels)
    if where_kind == "logits":
        targets = jnp.where(where, targets, 0)  # zero target on masked logits
    opts = resolve(opts, 6)
    got = jaxent.soft_cross_entropy(logits, targets, where=where, reduction=reduction, **opts)
    want = oracles.soft_cross_entropy(logits, targets, where=where, reduction=reduction, **opts)
    assert oracles.rel_err(got, want) < 1e-5


def test_soft_cross_entropy_gradients_and_minus_inf():
    logits, _ = make(16, (4,), 5)
    logits = logits.at[1, 2].set(-jnp.inf)
    targets = jax.nn.softmax(make(17, (4,), 5)[0]).at[1, 2].set(0.0)
    gx, gt = jax.grad(
        lambda x, t: jaxent.soft_cross_entropy(x, t, label_smoothing=0.1), argnums=(0, 1)
    )(logits, targets)
    want = oracle_grad(
        lambda x: oracles.soft_cross_entropy(x, targets, label_smoothing=0.1), logits
    )
    assert oracles.rel_err(gx, want) < 1e-5 and gx[1, 2] == 0
    assert np.all(np.isfinite(gt))
    lost = jaxent.soft_cross_entropy(logits, targets.at[1, 2].set(0.5), reduction="none")
    assert lost[1] == np.inf


@pytest.mark.parametrize("traced", [False, True])
def test_soft_cross_entropy_at_full_smoothing_ignores_mass_on_a_dropped_logit(traced):
    """ε = 1 replaces the targets by 1/C' over the C' kept logits: mass on a -inf
    logit no longer counts, so the loss is finite (float64 NumPy from the formula:
    the mean of lse - z over the kept logits); below ε = 1 it still makes +inf."""
    logits = jnp.array([[0.5, -1.0, -jnp.inf, 2.0]], F32)
    targets = jnp.array([[0.2, 0.3, 0.5, 0.0]], F32)
    want = oracles.soft_cross_entropy(logits, targets, label_smoothing=1.0, reduction="none")[0]

    def loss(x, eps):
        eps = jnp.float32(eps) if traced else eps
        return jaxent.soft_cross_entropy(x, targets, label_smoothing=eps, reduction="none")

    np.testing.assert_allclose(loss(logits, 1.0), [want], rtol=1e-6)
    grad = jax.grad(lambda x: loss(x, 1.0)[0])(logits)
    assert np.isfinite(grad).all() and grad[0, 2] == 0
    assert loss(logits, 0.5)[0] == np.inf


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": jnp.zeros(4, F32)}, TypeError, "`labels` must have an integer dtype"),
        ({"labels": jnp.zeros(3, int)}, ValueError, r"`labels` must have shape \(4,\), got \(3,\)"),
        ({"axis": 2}, ValueError, "`axis` must be in"),
        ({"reduction": "avg"}, ValueError, "`reduction` must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "`label_smoothing` must be"),
        ({"z_loss": -1.0}, ValueError, "`z_loss` must be a finite number >= 0.0, got -1.0"),
        ({"softcap": 0.0}, ValueError, "`softcap` must be a finite number > 0 or None, got 0.0"),
        ({"softcap": float("inf")}, ValueError, "`softcap` must be a finite number > 0"),
        ({"z_loss": float("inf")}, ValueError, "`z_loss` must be a finite number >= 0.0, got inf"),
        ({"return_aux": "no"}, TypeError, "`return_aux` must be True or False, got 'no'"),
        ({"labels": None}, TypeError, "`labels` must be an integer array, got NoneType"),
        ({"class_weights": jnp.ones(4)}, ValueError, r"`class_weights` must have shape \(5,\)"),
        ({"where": jnp.ones((4, 3), bool)}, ValueError, "`where` must be broadcastable"),
        ({"where": jnp.ones((5,), bool)}, ValueError, "same number of dimensions"),
        ({"where": jnp.ones(4, int)}, TypeError, "`where` must be a boolean mask"),
        ({"ignore_index": 1.0}, TypeError, "`ignore_index` must be an int"),
        ({"logits": jnp.zeros((4, 5), int)}, TypeError, "`logits` must have a floating dtype"),
    ],
)
def test_trace_time_errors_name_the_argument(kwargs, error, match):
    args = {"logits": jnp.zeros((4, 5), F32), "labels": jnp.zeros(4, int)}
    args.update(kwargs)
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(error, match=match):
        jaxent.cross_entropy(logits, labels, **args)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16])
def test_narrow_integer_labels(dtype):
    """Ids above 127, `ignore_index=-100` and the class count are compared in a wide
    dtype: in uint8, -100 would wrap to 156 and silently drop class 156."""
    logits, _ = make(11, (6,), 200)
    wide = (
        np.array([5, 156, 120, 44, 199, 0])
        if dtype != jnp.int8
        else np.array([5, 100, 120, 44, 127, 0])
    )
    labels = jnp.asarray(wide, dtype)

    def loss(x, y):
        return jaxent.cross_entropy(x, y, ignore_index=-100, label_smoothing=0.1)

    got, grad = jax.value_and_grad(loss)(logits, labels)
    want = oracles.cross_entropy(logits, wide, ignore_index=-100, label_smoothing=0.1)[0]
    assert oracles.rel_err(got, want) < 1e-5
    want_grad = jax.grad(loss)(logits, jnp.asarray(wide, jnp.int32))
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-8)


def test_float64_schedule_keeps_a_float32_loss():
    logits, labels = make(12, (5,), 7)
    loss = jaxent.cross_entropy(logits, labels, label_smoothing=jnp.float64(0.1),
                                z_loss=jnp.float64(1e-3))  # fmt: skip
    assert loss.dtype == F32
    soft = jaxent.soft_cross_entropy(logits, jax.nn.softmax(logits), z_loss=jnp.float64(1e-3))
    assert soft.dtype == F32


def test_soft_targets_shape_error():
    with pytest.raises(ValueError, match=r"`targets` must have shape \(4, 5\), got \(4, 4\)"):
        jaxent.soft_cross_entropy(jnp.zeros((4, 5)), jnp.zeros((4, 4)))


@pytest.mark.parametrize("impl", ["xla", None])
def test_scheduled_options_out_of_range_make_the_gradient_nan_too(impl):
    """A NaN loss from a scheduled label_smoothing or z_loss out of range comes with NaN
    gradients, so a step's guard on non-finite gradients (optax.apply_if_finite, loss
    scaling) skips it."""
    logits, labels = make(14, (4,), 5)
    targets = jax.nn.softmax(logits * 0.5)

    def grad(fn, **opts):
        return np.asarray(jax.grad(lambda z: fn(z, implementation=impl, **opts))(logits))

    for bad in (dict(label_smoothing=jnp.float32(1.5)), dict(z_loss=jnp.float32(-1.0))):
        assert np.isnan(grad(lambda z, **o: jaxent.cross_entropy(z, labels, **o), **bad)).all()
        soft = grad(lambda z, **o: jaxent.soft_cross_entropy(z, targets, **o), **bad)
        assert np.isnan(soft).all()


@pytest.mark.parametrize("impl", ["xla", None])
def test_padding_labels_masked_after_the_loss_train_as_with_where(impl):
    """Labels padded out of range (NaN loss there) and masked after reduction="none"
    with jnp.where — the optax idiom — give the gradients of dropping them with `where`."""
    logits, labels = make(15, (4,), 5)
    keep = jnp.array([True, False, True, False])
    padded = jnp.where(keep, labels, -100)

    def masked_after(z):
        loss = jaxent.cross_entropy(z, padded, reduction="none", implementation=impl)
        return jnp.where(keep, loss, 0).sum()

    def dropped(z):
        return jaxent.cross_entropy(z, labels, where=keep, reduction="sum", implementation=impl)

    np.testing.assert_allclose(jax.grad(masked_after)(logits), jax.grad(dropped)(logits))


def test_aux_values_are_float32_like_the_loss():
    """SPEC: the loss and aux values come back in float32 (num_valid included)."""
    logits, labels = make(16, (4,), 5)
    _, aux = jaxent.cross_entropy(logits.astype(jnp.bfloat16), labels, return_aux=True)
    for name, value in aux._asdict().items():
        assert value.dtype == jnp.float32, (name, value.dtype)
    assert aux.num_valid == 4


@pytest.mark.parametrize("soft", [False, True])
def test_traced_smoothing_and_z_loss_get_their_gradient(soft):
    """l is affine in ε and λ: its derivatives against central differences of the
    float64 oracle."""
    logits = jax.random.normal(jax.random.PRNGKey(11), (6, 5), F32) * 2
    labels = jnp.array([0, 4, 2, 2, 1, 3])
    w = jnp.linspace(0.5, 2.0, 5)

    def ours(ls, zl):
        if soft:
            t = jax.nn.one_hot(labels, 5)
            return jaxent.soft_cross_entropy(
                logits, t, class_weights=w, label_smoothing=ls, z_loss=zl
            )
        return jaxent.cross_entropy(logits, labels, class_weights=w, label_smoothing=ls, z_loss=zl)

    def oracle(ls, zl):
        if soft:
            t = np.eye(5)[np.asarray(labels)]
            return oracles.soft_cross_entropy(
                logits, t, class_weights=w, label_smoothing=ls, z_loss=zl
            )
        return oracles.cross_entropy(
            logits, labels, class_weights=w, label_smoothing=ls, z_loss=zl
        )[0]

    got = jax.grad(ours, argnums=(0, 1))(jnp.float32(0.1), jnp.float32(0.01))
    np.testing.assert_allclose(got, oracles.option_gradient(oracle, 0.1, 0.01), rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    options=st.fixed_dictionaries(
        {},
        optional={
            "class_weights": st.just(True),
            "label_smoothing": st.sampled_from([0.05, 0.3, 1.0]),
            "z_loss": st.sampled_from([1e-3, 0.1]),
            "softcap": st.sampled_from([0.5, 3.0]),
            "ignore_index": st.sampled_from([0, 2]),
        },
    ),
    where_kind=st.sampled_from([None, "positions", "logits"]),
    reduction=st.sampled_from(["none", "sum", "mean"]),
)
def test_random_option_combinations_match_oracle(n, c, seed, options, where_kind, reduction):
    """Any mix of the options, at any small size, value and gradient against the oracle."""
    logits, labels = make(seed, (n,), c)
    opts = resolve(options, c)
    where = where_for(where_kind, logits, labels, seed=seed + 1)

    def ours(x):
        return jaxent.cross_entropy(x, labels, where=where, reduction=reduction, **opts)

    def oracle(x):
        return oracles.cross_entropy(x, labels, where=where, reduction=reduction, **opts)[0]

    got, got_grad = jax.value_and_grad(lambda x: jnp.sum(ours(x)))(logits)
    assert oracles.rel_err(got, np.sum(oracle(logits))) < 1e-5
    want_grad = oracle_grad(lambda x: np.sum(oracle(x)), logits)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_traced_label_smoothing_below_zero_is_nan(soft):
    """A scheduled ε < 0 is out of range as ε > 1 is: loss and gradient NaN; ε = 0
    (the boundary) stays finite."""
    x, labels = make(31, (4,), 5)
    targets = jax.nn.softmax(x * 0.5)

    def f(z, eps):
        if soft:
            return jaxent.soft_cross_entropy(z, targets, label_smoothing=eps)
        return jaxent.cross_entropy(z, labels, label_smoothing=eps)

    assert np.isnan(f(x, jnp.float32(-0.1))) and np.isnan(jax.grad(f)(x, jnp.float32(-0.1))).all()
    assert np.isfinite(f(x, jnp.float32(0.0)))
