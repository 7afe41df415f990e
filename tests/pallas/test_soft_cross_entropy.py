"""`soft_cross_entropy` through the Pallas kernel (interpreted on CPU) against the XLA
path and the float64 NumPy oracle: options, odd sizes, both gradients (logits and
targets), edge rows; and through XLA's one-read reduction in the kernel's place. See
test_cross_entropy.py for the interpret-mode hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

from .. import oracles
from ..kernels import each_platform, kernel_mode

F32 = jnp.float32
TILES = {}  # this test's kernel_mode arguments (`each_platform` sets them)
_platform = each_platform(TILES, one_read=True)


def make(seed, n, c, dtype=F32):
    kx, kt = jax.random.split(jax.random.PRNGKey(seed))
    x = (jax.random.normal(kx, (n, c), F32) * 3).astype(dtype)
    t = jax.nn.softmax(jax.random.normal(kt, (n, c), F32) * 2, axis=-1)
    return x, t


def run(implementation, f, *args, **kw):
    if implementation == "xla":
        return f(*args, implementation="xla", **kw)
    with kernel_mode(**TILES):
        return f(*args, implementation="pallas", **kw)


ALL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)


@pytest.mark.parametrize("options,where", [({}, False), (ALL, True)])
def test_values_and_aux_match_oracle_and_xla(options, where):
    x, t = make(0, 9, 37)
    mask = jax.random.uniform(jax.random.PRNGKey(1), x.shape) > 0.3 if where else None
    if where:  # no target mass on dropped logits: finite losses
        t = jnp.where(mask, t, 0)
    opts = dict(options, class_weights=jnp.linspace(0.5, 1.5, 37, dtype=F32))
    kw = dict(where=mask, reduction="none", return_aux=True, **opts)
    got = run("pallas", jaxent.soft_cross_entropy, x, t, **kw)
    want = run("xla", jaxent.soft_cross_entropy, x, t, **kw)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    oracle = oracles.soft_cross_entropy(x, t, where=mask, reduction="none", **opts)
    assert oracles.rel_err(got[0], oracle) < 1e-5


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_gradients_of_logits_and_targets_match_xla(dtype):
    x, t = make(2, 10, 45, dtype)
    x = x.at[3, 7].set(-jnp.inf)
    t = t.at[3, 7].set(0.0)

    def grads(implementation):
        def loss(x, t):
            return run(implementation, jaxent.soft_cross_entropy, x, t, **ALL)

        return jax.value_and_grad(loss, argnums=(0, 1))(x, t)

    (loss, (gx, gt)), (want_loss, (wx, wt)) = grads("pallas"), grads("xla")
    assert gx.dtype == dtype and gt.dtype == F32
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert oracles.rel_err(gx.astype(F32), wx.astype(F32)) < tol
    assert oracles.rel_err(gt, wt) < 1e-5
    assert gx[3, 7] == 0 and gt[3, 7] == 0


def test_second_derivatives_match_xla():
    """A Hessian-vector product in (logits, targets) jointly, forward over reverse and
    reverse over reverse, through the kernel's forward-mode rule."""
    x, t = make(5, 10, 45)
    v = make(6, 10, 45)

    def hvps(implementation):
        def f(x, t):
            return run(implementation, jaxent.soft_cross_entropy, x, t, **ALL)

        def grad_dot_v(x, t):
            return sum(jnp.vdot(g, u) for g, u in zip(jax.grad(f, (0, 1))(x, t), v, strict=True))

        forward = jax.jvp(jax.grad(f, (0, 1)), (x, t), v)[1]
        return forward, jax.grad(grad_dot_v, (0, 1))(x, t)

    got, want = hvps("pallas"), hvps("xla")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert oracles.rel_err(a, b) < 1e-5


def test_edge_rows_and_odd_sizes():
    """Mass on a dropped logit -> +inf; every logit dropped -> dropped position; NaN
    propagates; C = 1."""
    x, t = make(3, 5, 20)
    x = x.at[0, 3].set(-jnp.inf)
    t = t.at[0, 3].set(0.2)
    x = x.at[1].set(-jnp.inf)
    x = x.at[2, 19].set(jnp.nan)
    loss, aux = run("pallas", jaxent.soft_cross_entropy, x, t, reduction="none", return_aux=True)
    assert loss[0] == jnp.inf and loss[1] == 0 and np.isnan(loss[2])
    assert int(aux.num_valid) == 4
    np.testing.assert_allclose(loss, oracles.soft_cross_entropy(x, t, reduction="none"), rtol=1e-5)
    x1, t1 = make(4, 6, 1)
    np.testing.assert_allclose(
        run("pallas", jaxent.soft_cross_entropy, x1, t1, label_smoothing=0.2),
        run("xla", jaxent.soft_cross_entropy, x1, t1, label_smoothing=0.2),
        rtol=1e-6,
    )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_nan_target_on_a_dropped_logit_is_nan(implementation):
    """A NaN target makes the loss NaN wherever it sits: on a dropped (-inf or masked)
    logit too, where a non-zero target gives +inf; dropped positions stay 0."""
    x, t = make(5, 4, 20)
    x = x.at[0, 3].set(-jnp.inf)
    t = t.at[0, 3].set(jnp.nan).at[2, 3].set(jnp.nan)
    mask = jnp.ones(x.shape, bool).at[2, 3].set(False)  # row 2: NaN target, masked logit
    keep = jnp.array([True, False, True, True])
    t = t.at[1, 0].set(jnp.nan)  # a dropped position's NaN target: still 0
    loss = run(implementation, jaxent.soft_cross_entropy, x, t, reduction="none",
               where=mask & keep[:, None], **ALL)  # fmt: skip
    assert np.isnan(loss[0]) and loss[1] == 0 and np.isnan(loss[2]) and np.isfinite(loss[3])


def test_accuracy_compares_first_argmaxes_across_tiles():
    x = jnp.zeros((3, 40), F32).at[:, 7].set(1.0).at[:, 30].set(1.0)  # tied logits
    t = jnp.zeros((3, 40), F32).at[0, 7].set(1.0).at[1, 30].set(1.0).at[2, 7].set(0.5)
    t = t.at[2, 33].set(0.5)  # tied targets: the first (7) counts
    _, aux = run("pallas", jaxent.soft_cross_entropy, x, t, return_aux=True)
    np.testing.assert_allclose(aux.accuracy, 2 / 3, rtol=1e-6)


def test_grad_of_vmap_over_targets_only_equals_loop():
    """Shared logits, batched targets: the sums come out batched together."""
    x, _ = make(7, 6, 37)
    many = jnp.stack([make(8 + i, 6, 37)[1] for i in range(3)])

    def grad_of_vmap(implementation):
        def batched(x):
            return jax.vmap(lambda t: run(implementation, jaxent.soft_cross_entropy, x, t, **ALL))(
                many
            )

        return jax.grad(lambda x: jnp.sum(batched(x)))(x)

    def loss(x, t):
        return run("xla", jaxent.soft_cross_entropy, x, t, **ALL)

    want = sum(jax.grad(loss)(x, t) for t in many)
    assert oracles.rel_err(grad_of_vmap("pallas"), want) < 1e-6
    assert oracles.rel_err(grad_of_vmap("xla"), want) < 1e-6
