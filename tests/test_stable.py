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


def test_fused_label_transpose_matches_autodiff_scatter():
    z = _logits(4, (6, 11))
    index = jnp.array([0, 10, 3, 3, 7, 1])
    g = jax.random.normal(jax.random.PRNGKey(5), (6,))

    def via(take):
        return jax.vjp(lambda z: take(z, index), z)[1](g)[0]

    plain = via(lambda z, i: jnp.take_along_axis(z, i[:, None], axis=-1)[:, 0])
    np.testing.assert_array_equal(via(_stable._take_label_fused), plain)
    np.testing.assert_array_equal(via(_stable.take_label), plain)


def test_lse_of_an_empty_row_is_minus_inf_with_zero_gradient():
    z = jnp.array([[-jnp.inf, -jnp.inf], [0.0, 1.0]])
    st = _stable.stable_exp(z)
    assert st.lse[0] == -jnp.inf and not st.any_kept[0]
    np.testing.assert_allclose(st.lse[1], np.log(1 + np.e), rtol=1e-6)
    grad = jax.grad(lambda z: jnp.where(jnp.isfinite(st.lse), _stable.stable_exp(z).lse, 0).sum())(
        z
    )
    assert np.all(np.isfinite(grad)) and np.all(grad[0] == 0)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_masked_nan_logit_reaches_neither_value_nor_gradient(softcap):
    x = jnp.array([[1.0, jnp.nan, 0.5]])
    mask = jnp.array([[True, False, True]])
    z = _stable.prepare_logits(x, mask, softcap)
    assert z[0, 1] == -jnp.inf and np.all(np.isfinite(z[0, [0, 2]]))

    def lse(x):
        return _stable.stable_exp(_stable.prepare_logits(x, mask, softcap)).lse[0]

    grad = jax.grad(lse)(x)
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
