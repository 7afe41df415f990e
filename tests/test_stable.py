"""Internal building blocks of jaxent._stable: the properties the fused paths rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import _stable


def _logits(seed, shape, scale=3.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * scale


def test_partial_sums_over_blocks_equal_whole_row():
    z = _logits(0, (5, 23))
    labels = jnp.array([0, 7, 22, 11, 5])
    weights = jax.random.uniform(jax.random.PRNGKey(1), (23,)) + 0.5
    m = _stable.safe_shift(jnp.max(z, axis=-1))
    whole = _stable.block_partial(z, labels, 0, m, weights, smoothing=True)
    cuts = [0, 4, 13, 23]
    parts = [
        _stable.block_partial(z[:, a:b], labels, a, m, weights[a:b], smoothing=True)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    summed = jax.tree.map(lambda *xs: sum(xs), *parts)
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rescale_equals_recomputing_with_the_new_shift():
    z = _logits(2, (4, 17))
    labels = jnp.array([1, 2, 3, 4])
    m_old = jnp.array([0.0, 1.0, -2.0, 5.0])
    m_new = jnp.max(z, axis=-1)
    old = _stable.block_partial(z, labels, 0, m_old, None, smoothing=True)
    new = _stable.block_partial(z, labels, 0, m_new, None, smoothing=True)
    moved = _stable.rescale(old, m_old, m_new)
    np.testing.assert_allclose(moved.s, new.s, rtol=1e-5)
    np.testing.assert_allclose(moved.below_max, new.below_max, rtol=1e-5)


def test_label_outside_block_contributes_nothing():
    z = _logits(3, (3, 8))
    p = _stable.block_partial(z, jnp.array([8, -1, 100]), 0, jnp.zeros(3), None, False)
    np.testing.assert_array_equal(p.label_hits, 0)
    np.testing.assert_array_equal(p.z_label, 0)


@pytest.mark.parametrize("save_exp", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_pass_backward_matches_autodiff(save_exp, softcap, smoothing, masked, weighted):
    """Both one-pass backwards of `logit_partial` (accelerators recompute exp, CPU saves
    it; both run here on CPU) against autodiff of the same forward, for random
    cotangents of every per-row sum."""
    n, c, offset = 7, 13, 5
    x = _logits(6, (n, c)).at[1, 3].set(-jnp.inf).at[2].set(-jnp.inf)
    labels = jnp.array([5, 9, 17, 30, 2, 11, 8])  # 30 and 2 fall outside this block
    mask = jax.random.uniform(jax.random.PRNGKey(7), (n, c)) > 0.3 if masked else None
    weights = jax.random.uniform(jax.random.PRNGKey(8), (c,)) + 0.5 if weighted else None
    z = _stable.prepare_logits(x, mask, softcap)
    m = _stable.safe_shift(jnp.max(z, axis=-1))

    def autodiff(x):
        z = _stable.prepare_logits(x, mask, softcap)
        return _stable.block_partial(z, labels, offset, m, weights, smoothing)

    def one_pass(x):
        args = (x, labels, offset, m, weights, mask)
        fields = _stable.structure_of(
            lambda *a: _stable._logit_sums(softcap, smoothing, *a)[0], *args
        )
        stacked = _stable._logit_partial(softcap, smoothing, save_exp, fields, *args)
        return _stable.unstacked(fields, stacked)

    want, vjp_want = jax.vjp(autodiff, x)
    got, vjp_got = jax.vjp(one_pass, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(9), len(jax.tree.leaves(want)))
    ct = jax.tree.unflatten(
        jax.tree.structure(want),
        [
            jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, jax.tree.leaves(want), strict=True)
        ],
    )
    np.testing.assert_allclose(vjp_got(ct)[0], vjp_want(ct)[0], rtol=1e-5, atol=1e-6)


def lse(z):
    """log-sum-exp over the last axis from `_stable`'s pieces: shift, sum, `lse_from_sum`."""
    m = _stable.safe_shift(jnp.max(z, axis=-1))
    return _stable.lse_from_sum(jnp.sum(jnp.exp(z - m[..., None]), axis=-1), m)


def test_lse_of_an_empty_row_is_minus_inf_with_zero_gradient():
    z = jnp.array([[-jnp.inf, -jnp.inf], [0.0, 1.0]], jnp.float32)
    got = lse(z)
    assert got[0] == -jnp.inf
    np.testing.assert_allclose(got[1], np.log(1 + np.e), rtol=1e-6)
    grad = jax.grad(lambda z: jnp.where(jnp.isfinite(got), lse(z), 0).sum())(z)
    assert np.all(np.isfinite(grad)) and np.all(grad[0] == 0)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_masked_nan_logit_reaches_neither_value_nor_gradient(softcap):
    x = jnp.array([[1.0, jnp.nan, 0.5]])
    mask = jnp.array([[True, False, True]])
    z = _stable.prepare_logits(x, mask, softcap)
    assert z[0, 1] == -jnp.inf and np.all(np.isfinite(z[0, [0, 2]]))

    grad = jax.grad(lambda x: lse(_stable.prepare_logits(x, mask, softcap))[0])(x)
    assert grad[0, 1] == 0 and np.all(np.isfinite(grad))


def test_softcap_keeps_minus_inf_dropped():
    z = _stable.prepare_logits(jnp.array([[-jnp.inf, 3.0]]), None, 1.0)
    assert z[0, 0] == -jnp.inf
    np.testing.assert_allclose(z[0, 1], np.tanh(3.0), rtol=1e-6)


def test_first_argmax_prefers_the_first_maximum():
    z = jnp.array([[1.0, 3.0, 3.0, -jnp.inf], [-jnp.inf] * 4])
    best, first = _stable.row_max(z, 10)
    np.testing.assert_array_equal(first[0], 11)
    assert best[1] == -jnp.inf


def test_rescale_keeps_an_empty_row_at_zero():
    """A row with nothing kept yet (s = 0, placeholder shift 0) moved to a shift far
    below -88: exp(0 - m) overflows, and 0 * inf must not turn the sums into NaN."""
    empty = _stable.block_partial(
        jnp.full((1, 3), -jnp.inf), jnp.array([0]), 0, jnp.zeros(1), None, smoothing=True
    )
    moved = _stable.rescale(empty, jnp.zeros(1), jnp.array([-300.0]))
    for leaf in jax.tree.leaves(moved):
        np.testing.assert_array_equal(leaf, 0)


def test_soft_partial_sums_over_blocks_equal_whole_row_after_rescale():
    z = _logits(10, (4, 19)).at[0, 3].set(-jnp.inf)
    t = jax.nn.softmax(_logits(11, (4, 19)), axis=-1)
    w = jax.random.uniform(jax.random.PRNGKey(12), (19,), jnp.float32) + 0.5
    m = _stable.safe_shift(jnp.max(z, axis=-1))
    whole = _stable.soft_sums(z, t, m, w, smoothing=True)
    a, b = z[:, :7], z[:, 7:]
    ma = _stable.safe_shift(jnp.max(a, axis=-1))
    first = _stable.rescale(_stable.soft_sums(a, t[:, :7], ma, w[:7], True), ma, m)
    second = _stable.soft_sums(b, t[:, 7:], m, w[7:], True)
    summed = jax.tree.map(jnp.add, first, second)
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save_exp", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("smoothing", [False, True])
def test_soft_one_pass_backward_matches_autodiff(save_exp, softcap, smoothing):
    """`soft_grad` (both gradients, logits and targets) against autodiff of `soft_sums`,
    with a mask, class weights, a -inf logit and a masked-out NaN."""
    n, c = 5, 11
    x = _logits(13, (n, c)).at[1, 3].set(-jnp.inf).at[2, 4].set(jnp.nan)
    t = jax.nn.softmax(_logits(14, (n, c)), axis=-1)
    mask = (jax.random.uniform(jax.random.PRNGKey(15), (n, c)) > 0.3).at[2, 4].set(False)
    w = jax.random.uniform(jax.random.PRNGKey(16), (c,), jnp.float32) + 0.5
    m = _stable.safe_shift(jnp.max(_stable.prepare_logits(x, mask, softcap), axis=-1))

    def autodiff(x, t):
        return _stable.soft_sums(_stable.prepare_logits(x, mask, softcap), t, m, w, smoothing)

    def one_pass(x, t):
        args = (x, t, m, w, mask)
        fields = _stable.structure_of(
            lambda *a: _stable._soft_sums(softcap, smoothing, *a)[0], *args
        )
        stacked = _stable._soft_partial(softcap, smoothing, save_exp, fields, *args)
        return _stable.unstacked(fields, stacked)

    want, vjp_want = jax.vjp(autodiff, x, t)
    got, vjp_got = jax.vjp(one_pass, x, t)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    leaves = jax.tree.leaves(want)
    keys = jax.random.split(jax.random.PRNGKey(17), len(leaves))
    noise = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    ct = jax.tree.unflatten(jax.tree.structure(want), noise)
    for a, b in zip(vjp_got(ct), vjp_want(ct), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
