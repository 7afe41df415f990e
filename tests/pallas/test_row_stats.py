"""The row-statistics kernels, run in the Pallas interpreter, against the XLA path.

`kernel_stats` and `_stable.logit_stats` have one signature and the same results: the
`Partial` sums (at the shift of the row max), the row max and the first argmax. Every
test runs three times: against the GPU kernel (Triton, `row_stats.py`), the TPU kernel
(Mosaic, `row_stats_tpu.py`), and XLA's one-read variadic reduction (`_one_read.py`),
which takes the kernel's place off CUDA and CPU. Small tiles make every case cross
several tiles, a ragged last tile and a ragged last block of rows — the TPU kernel's
blocks are at least (8, 128), so the sizes include C > 128.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import _stable
from jaxent.pallas import row_stats_tpu
from jaxent.pallas.row_stats import forward_stats, kernel_soft_stats, kernel_stats

F32 = jnp.float32
# The kernel options of each kernel's run: Triton's 4-row x 16-class tiles; Mosaic's
# 16-row x 128-class blocks, worked 8 rows at a time (`CHUNK`, set by `_kernel`).
KERNELS = {
    "triton": dict(interpret=True, block_rows=4, block_classes=16),
    "mosaic": dict(interpret=True, block_rows=16, block_classes=128, mosaic=True),
    # No kernel: XLA's one-read reduction (`jaxent._one_read`) in the kernel's place.
    "xla": dict(xla=True),
}
kernel_options: dict = {}
CHUNK = row_stats_tpu.CHUNK  # the kernel's default; the fixture lowers it to 8


@pytest.fixture(autouse=True, params=sorted(KERNELS))
def _kernel(request, monkeypatch):
    monkeypatch.setattr(row_stats_tpu, "CHUNK", 8)
    kernel_options.clear()
    kernel_options.update(KERNELS[request.param])


def logits_with_edge_rows(n, c, dtype, seed=0):
    """Random logits with the rows the kernel must get right: a -inf logit, a row with
    nothing kept, a NaN, a row far below -88 (exp(0 - m) overflows), tied maxima."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, c), F32) * 3
    if n >= 6 and c >= 3:
        x = x.at[0, 1].set(-jnp.inf)
        x = x.at[1].set(-jnp.inf)
        x = x.at[2, c - 1].set(jnp.nan)
        x = x.at[3].add(-300.0)
        x = x.at[4, :].set(1.0).at[4, c // 2 :].set(2.0)  # first max in the middle
        x = x.at[5, c - 1].set(50.0)  # max in the ragged last tile
    return x.astype(dtype)


def both(x, labels, offset, weights, mask, **options):
    """(kernel, XLA) statistics; jitted, so each is one compilation (eager is slower)."""
    xla = functools.partial(_stable.logit_stats, **options)
    kernel = functools.partial(kernel_stats, **options, **kernel_options)
    args = (x, labels, offset, weights, mask)
    return jax.jit(kernel)(*args), jax.jit(xla)(*args)


def assert_same_stats(got, want, rtol):
    """Equal statistics; a row whose sum is NaN has the max NaN in the kernels
    (`row_stats._rows`), where XLA:CPU's max may skip the NaN inside a fusion (its fast
    min/max): the loss is NaN either way."""
    best = jnp.where(jnp.isnan(want[0].s), jnp.nan, want[1])
    want = (want[0], best, *want[2:])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)  # NaN == NaN here


# C = 1; odd C and N; C a multiple of the tile and N of the row block; both ragged;
# the same past the TPU kernel's 128 classes.
SIZES = [(1, 1, F32), (9, 37, jnp.bfloat16), (8, 64, F32), (13, 100, jnp.bfloat16),
         (32, 256, F32), (37, 300, jnp.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("n,c,dtype", SIZES)
def test_plain_statistics_match_xla(n, c, dtype):
    x = logits_with_edge_rows(n, c, dtype)
    labels = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, c)
    options = dict(softcap=None, smoothing=False, with_argmax=True)
    got, want = both(x, labels, 0, None, None, **options)
    assert_same_stats(got, want, rtol=1e-6)


@pytest.mark.parametrize("n,c", [(1, 1), (13, 100), (37, 300)])
def test_every_option_matches_xla(n, c):
    x = logits_with_edge_rows(n, c, jnp.float16, seed=2)
    offset = 5  # this block holds classes 5..5+C-1 of a larger vocabulary
    labels = jax.random.randint(jax.random.PRNGKey(3), (n,), 0, c + 10)  # some outside
    weights = jax.random.uniform(jax.random.PRNGKey(4), (c,), F32, 0.2, 2.0)
    mask = jax.random.uniform(jax.random.PRNGKey(5), (n, c)) > 0.3
    options = dict(softcap=3.0, smoothing=True, with_argmax=True)
    got, want = both(x, labels, offset, weights, mask, **options)
    assert_same_stats(got, want, rtol=1e-5)


def test_masked_nan_and_inf_never_leak():
    x = jnp.array([[1.0, jnp.nan, jnp.inf, 0.5], [jnp.nan, 2.0, 1.0, 0.0]], F32)
    mask = jnp.array([[True, False, False, True], [True, True, True, True]])
    options = dict(softcap=None, smoothing=True, with_argmax=True)
    got, want = both(x, jnp.array([0, 1]), 0, None, mask, **options)
    assert_same_stats(got, want, rtol=1e-6)
    partial, best, first = got
    assert np.isfinite(partial.s[0]) and best[0] == 1.0
    assert np.isnan(partial.s[1]) and np.isnan(best[1]) and first[1] == 0  # NaN is the max


def test_a_plus_inf_logit_makes_its_row_nan():
    """A kept +inf logit: exp(inf - inf) reaches s as NaN (the loss is NaN, as XLA's
    two reads give); the row beside it stays finite."""
    x = jnp.array([[0.5, jnp.inf, -1.0, 2.0], [1.0, 2.0, 3.0, 4.0]], F32)
    options = dict(softcap=None, smoothing=False, with_argmax=False)
    got, want = both(x, jnp.array([0, 1]), 0, None, None, **options)
    for partial, _, _ in (got, want):
        assert np.isnan(partial.s[0]) and np.isfinite(partial.s[1])


def test_a_row_block_that_is_not_a_power_of_two(monkeypatch):
    """N = 37 in one block of at most 64 rows: the TPU kernel's block is 40 rows (N
    rounded up to its 8-row tile), worked in chunks of the default CHUNK that must
    divide 40 (8, not 32); every row against XLA and float64 NumPy."""
    monkeypatch.setattr(row_stats_tpu, "CHUNK", CHUNK)
    for n in range(1, 100):
        for block_rows in (None, 8, 64, 512):
            rows, _, chunk = row_stats_tpu.tile_sizes(n, 300, block_rows, None)
            assert rows % chunk == 0 and chunk <= CHUNK, (n, block_rows, rows, chunk)
    x = logits_with_edge_rows(37, 300, F32, seed=9)
    labels = jax.random.randint(jax.random.PRNGKey(10), (37,), 0, 300)
    options = dict(softcap=None, smoothing=False, with_argmax=True)
    kernel = functools.partial(kernel_stats, **options, **{**kernel_options, "block_rows": 64})
    got = jax.jit(kernel)(x, labels, 0, None, None)
    assert_same_stats(got, jax.jit(functools.partial(_stable.logit_stats, **options))(
        x, labels, 0, None, None), rtol=1e-6)  # fmt: skip
    clean = np.asarray(x[6:], np.float64)  # the edge rows are checked above, against XLA
    np.testing.assert_allclose(got[1][6:], clean.max(axis=1), rtol=1e-6)


def test_values_against_numpy():
    """Independent of both implementations: float64 NumPy sums of one ragged row block."""
    x = logits_with_edge_rows(7, 45, F32, seed=6)[6:]
    labels = jnp.array([44])
    weights = np.linspace(0.5, 1.5, 45)
    (partial, best, first), _ = both(
        x, labels, 0, jnp.asarray(weights, F32), None,
        softcap=None, smoothing=True, with_argmax=True,
    )  # fmt: skip
    row = np.asarray(x[0], np.float64)
    m = row.max()
    np.testing.assert_allclose(best[0], m, rtol=1e-6)
    assert first[0] == int(np.argmax(row))
    np.testing.assert_allclose(partial.s[0], np.exp(row - m).sum(), rtol=1e-5)
    np.testing.assert_allclose(partial.z_label[0], row[44], rtol=1e-6)
    np.testing.assert_allclose(partial.w_label[0], weights[44], rtol=1e-6)
    np.testing.assert_allclose(partial.below_max[0], (weights * (m - row)).sum(), rtol=1e-5)
    np.testing.assert_allclose(partial.kw_sum[0], weights.sum(), rtol=1e-6)
    assert partial.count[0] == 45


def test_gradient_is_the_one_pass_formula():
    """The kernel's custom VJP (the shared `_stable.partial_grad`) against autodiff of
    the XLA statistics, for random cotangents of every sum."""
    n, c = 6, 21
    x = logits_with_edge_rows(n, c, F32, seed=8)
    x = x.at[2, c - 1].set(0.0)  # no NaN: compare finite gradients
    labels = jax.random.randint(jax.random.PRNGKey(9), (n,), 0, c)
    weights = jax.random.uniform(jax.random.PRNGKey(10), (c,), F32, 0.2, 2.0)
    mask = jax.random.uniform(jax.random.PRNGKey(11), (n, c)) > 0.2
    options = dict(softcap=2.5, smoothing=True, with_argmax=False)

    def autodiff(x):
        z = _stable.prepare_logits(x, mask, 2.5)
        m = _stable.safe_shift(jnp.max(z, axis=-1))
        return _stable.block_partial(z, labels, 0, m, weights, True)

    def kernel(x):
        return kernel_stats(x, labels, 0, weights, mask, **options, **kernel_options)[0]

    want, vjp_want = jax.vjp(jax.jit(autodiff), x)
    got, vjp_got = jax.vjp(jax.jit(kernel), x)
    leaves = jax.tree.leaves(want)
    keys = jax.random.split(jax.random.PRNGKey(12), len(leaves))
    noise = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    ct = jax.tree.unflatten(jax.tree.structure(want), noise)
    (g_got,), (g_want,) = jax.jit(vjp_got)(ct), jax.jit(vjp_want)(ct)
    assert np.all(np.isfinite(g_got)) and np.any(g_got != 0)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g_got)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("masked", [False, True])
def test_forward_stats_match_xla_with_derivatives_in_both_modes(masked):
    """`forward_stats` (no custom VJP, for a forward pass inside another's forward
    rule): the kernel's results, with forward-mode and reverse-mode derivatives equal
    to those of the two-read XLA statistics it replaces (`one_pass_backward=False`)."""
    n, c = 13, 300
    x = jax.random.normal(jax.random.PRNGKey(13), (n, c), F32) * 3
    labels = jax.random.randint(jax.random.PRNGKey(14), (n,), 0, c + 10)
    weights = jax.random.uniform(jax.random.PRNGKey(15), (c,), F32, 0.2, 2.0)
    mask = jax.random.uniform(jax.random.PRNGKey(16), (n, c)) > 0.3 if masked else None
    options = dict(softcap=3.0, smoothing=True, with_argmax=True)
    xla = functools.partial(_stable.logit_stats, **options, one_pass_backward=False)
    kernel = functools.partial(forward_stats, **options, **kernel_options)

    def sums(stats, x):
        return stats(x, labels, 7, weights, mask)[0]

    assert_same_stats(jax.jit(kernel)(x, labels, 7, weights, mask),
                      jax.jit(xla)(x, labels, 7, weights, mask), rtol=1e-5)  # fmt: skip
    tangent = jax.random.normal(jax.random.PRNGKey(17), x.shape, F32)
    got = jax.jit(lambda x, t: jax.jvp(functools.partial(sums, kernel), (x,), (t,)))(x, tangent)
    want = jax.jit(lambda x, t: jax.jvp(functools.partial(sums, xla), (x,), (t,)))(x, tangent)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    def scalar(stats, x):  # a random mix of every float sum
        leaves = [a for a in jax.tree.leaves(sums(stats, x)) if a.dtype == F32]
        return sum(jnp.vdot(jnp.cos(jnp.arange(n) + i), a) for i, a in enumerate(leaves))

    g_got = jax.jit(jax.grad(functools.partial(scalar, kernel)))(x)
    g_want = jax.jit(jax.grad(functools.partial(scalar, xla)))(x)
    assert np.any(np.asarray(g_got) != 0)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(softcap=None, smoothing=False, with_argmax=False),
    dict(softcap=3.0, smoothing=True, with_argmax=True),
])  # fmt: skip
@pytest.mark.parametrize("n,c", [(9, 37), (37, 300)])
def test_soft_statistics_match_xla(options, n, c):
    """Probability targets: `kernel_soft_stats` against `_stable.soft_stats`, with target
    mass on a dropped logit (the `lost` count), NaN and tied targets."""
    x = logits_with_edge_rows(n, c, jnp.bfloat16, seed=13)
    t = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(14), (n, c), F32), axis=-1)
    t = t.at[0, 1].set(0.5).at[6, 30].set(jnp.nan).at[7, 3].set(1.0).at[7, 20].set(1.0)
    weights = jax.random.uniform(jax.random.PRNGKey(15), (c,), F32, 0.2, 2.0)
    mask = jax.random.uniform(jax.random.PRNGKey(16), (n, c)) > 0.2
    args = (x, t, 3, weights, mask)
    want = jax.jit(functools.partial(_stable.soft_stats, **options))(*args)
    kernel = functools.partial(kernel_soft_stats, **options, **kernel_options)
    got = jax.jit(kernel)(*args)
    assert_same_stats(got, want, rtol=1e-5)
    dropped = ~np.asarray(mask[0]) | np.isneginf(np.asarray(x[0], np.float32))
    assert got[0].lost[0] == dropped.sum() > 0  # every target of row 0 is positive
