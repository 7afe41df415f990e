"""`cross_entropy` through the Pallas kernels (interpreted on CPU) against the XLA path
and the float64 NumPy oracle: every option, odd sizes, values, aux and gradients.

`jaxent.pallas.interpret_mode(...)` is the documented test hook: inside it the public
function takes the kernel path (wrapper, custom VJP, dispatch) exactly as on a GPU,
with the kernel run by the Pallas interpreter and small tiles so that every case
crosses tiles and ends in a ragged tile and a ragged block of rows (`kernel_mode`: on
a GPU the same tiles compiled). Every test runs three times: through the GPU kernel,
with `platform="tpu"` through the TPU kernel (whose smallest blocks, 8 x 128, hold these
classes whole; `test_row_stats.py` crosses them), and through XLA's one-read reduction
in the kernel's place (`kernels.each_platform`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxent

from .. import oracles
from ..kernels import each_platform, kernel_mode

F32 = jnp.float32
TILES = {}  # this test's kernel_mode arguments (`each_platform` sets them)
_platform = each_platform(TILES, one_read=True)


def make(seed, shape, c, dtype=F32, scale=3.0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = (jax.random.normal(kx, shape + (c,), F32) * scale).astype(dtype)
    return x, jax.random.randint(ky, shape, 0, c, jnp.int32)


def weights(c):
    return jax.random.uniform(jax.random.PRNGKey(11), (c,), F32, 0.2, 2.0)


def pallas(f, *args, **kw):
    with kernel_mode(**TILES):
        return f(*args, implementation="pallas", **kw)


def xla(f, *args, **kw):
    return f(*args, implementation="xla", **kw)


def assert_tree_close(got, want, rtol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)


OPTIONS = {
    "plain": {},
    "all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, ignore_index=2, weighted=True),
    "smooth-weights": dict(label_smoothing=0.3, weighted=True),
    "softcap-zloss": dict(softcap=2.0, z_loss=1e-2),
}


def options(name, c):
    opts = dict(OPTIONS[name])
    if opts.pop("weighted", False):
        opts["class_weights"] = weights(c)
    return opts


def where_for(kind, x, labels):
    if kind is None:
        return None
    shape = labels.shape if kind == "positions" else x.shape
    mask = jax.random.uniform(jax.random.PRNGKey(5), shape) > 0.3
    if kind == "logits":  # keep the labels' own logits: finite losses
        mask = mask | jax.nn.one_hot(labels, x.shape[-1], dtype=bool)
    return mask


@pytest.mark.parametrize(
    "name,where_kind",
    [("plain", None), ("all", "positions"), ("all", "logits"), ("smooth-weights", "logits"),
     ("softcap-zloss", None)],
)  # fmt: skip
def test_values_and_aux_match_oracle_and_xla(name, where_kind):
    x, labels = make(0, (9,), 37)
    opts = options(name, 37)
    where = where_for(where_kind, x, labels)
    kw = dict(where=where, reduction="none", return_aux=True, **opts)
    got = pallas(jaxent.cross_entropy, x, labels, **kw)
    assert_tree_close(got, xla(jaxent.cross_entropy, x, labels, **kw), rtol=1e-5)
    want, want_aux = oracles.cross_entropy(x, labels, where=where, reduction="none", **opts)
    loss, aux = got
    assert loss.dtype == F32
    assert oracles.rel_err(loss, want) < 1e-5
    np.testing.assert_allclose(aux.accuracy, want_aux["accuracy"], rtol=1e-6)
    assert int(aux.num_valid) == want_aux["num_valid"]
    np.testing.assert_allclose(aux.lse, want_aux["lse"], rtol=1e-5)


@pytest.mark.parametrize(
    "name,where_kind,dtype",
    [("plain", None, F32), ("plain", "logits", jnp.bfloat16), ("all", None, jnp.bfloat16),
     ("all", "logits", F32)],
)  # fmt: skip
def test_gradients_match_xla(name, where_kind, dtype):
    x, labels = make(1, (2, 5), 45, dtype)  # 10 rows: 3 blocks of 4; 45 classes: 3 tiles
    x = x.at[0, 1, 3].set(-jnp.inf)
    opts = options(name, 45)
    where = where_for(where_kind, x, labels)

    def grad(run):
        return jax.value_and_grad(
            lambda x: run(jaxent.cross_entropy, x, labels, where=where, **opts)
        )(x)

    (loss, g), (want_loss, want_g) = grad(pallas), grad(xla)
    assert g.dtype == dtype and loss.dtype == F32
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert oracles.rel_err(g.astype(F32), want_g.astype(F32)) < tol
    assert g[0, 1, 3] == 0
    if where is not None:
        assert np.all(np.asarray(g)[~np.asarray(where)] == 0)


def test_gradient_matches_oracle_finite_differences():
    x, labels = make(2, (3,), 17)
    opts = options("all", 17)
    got = pallas(jax.grad(lambda x, **kw: jaxent.cross_entropy(x, labels, **kw, **opts)), x)
    h, want = 1e-6, np.zeros(x.shape)
    base = np.asarray(x, np.float64)
    for idx in np.ndindex(*x.shape):
        up, down = base.copy(), base.copy()
        up[idx] += h
        down[idx] -= h
        f = lambda a: oracles.cross_entropy(a, labels, **opts)[0]  # noqa: E731
        want[idx] = (f(up) - f(down)) / (2 * h)
    assert oracles.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("where_kind", [None, "logits"])
def test_second_derivatives_match_xla(where_kind):
    """Hessian-vector products (forward over reverse, and reverse over reverse) through
    the kernel: its forward-mode rule takes the sums' tangents from XLA."""
    x, labels = make(6, (2, 5), 45)
    v = make(7, (2, 5), 45)[0]
    opts = options("all", 45)
    where = where_for(where_kind, x, labels)

    def hvps(run):
        def f(x):
            return run(jaxent.cross_entropy, x, labels, where=where, **opts)

        forward = jax.jvp(jax.grad(f), (x,), (v,))[1]
        reverse = jax.grad(lambda z: jnp.vdot(jax.grad(f)(z), v))(x)
        return forward, reverse

    for got, want in zip(hvps(pallas), hvps(xla), strict=True):
        assert oracles.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("n,c", [(1, 1), (5, 1), (6, 33)])
def test_odd_sizes(n, c):
    x, labels = make(3, (n,), c, jnp.float16)
    kw = dict(label_smoothing=0.2, return_aux=True)
    assert_tree_close(
        pallas(jaxent.cross_entropy, x, labels, **kw),
        xla(jaxent.cross_entropy, x, labels, **kw),
        rtol=1e-5,
    )


def test_edge_rows():
    """-inf label logit -> +inf; every logit dropped -> dropped position; NaN propagates;
    out-of-range label -> NaN; rows far below -88 stay finite."""
    x, labels = make(4, (7,), 20)
    x = x.at[0, 3].set(-jnp.inf)
    labels = labels.at[0].set(3)
    x = x.at[1].set(-jnp.inf)
    x = x.at[2, 19].set(jnp.nan)
    labels = labels.at[3].set(20)
    x = x.at[4].add(-500.0)
    loss, aux = pallas(jaxent.cross_entropy, x, labels, reduction="none", return_aux=True)
    assert loss[0] == jnp.inf
    assert loss[1] == 0 and aux.lse[1] == -jnp.inf
    assert np.isnan(loss[2]) and np.isnan(loss[3])
    assert np.all(np.isfinite(np.asarray(loss)[4:]))
    want = oracles.cross_entropy(x, labels, reduction="none")[0]
    np.testing.assert_allclose(loss, want, rtol=1e-5)  # inf, 0 and NaN where they should be
    assert int(aux.num_valid) == 6


def test_accuracy_takes_the_first_of_tied_maxima():
    x = jnp.zeros((3, 40), F32).at[:, 7].set(1.0).at[:, 30].set(1.0)  # ties across tiles
    labels = jnp.array([7, 30, 7])
    _, aux = pallas(jaxent.cross_entropy, x, labels, return_aux=True)
    np.testing.assert_allclose(aux.accuracy, 2 / 3, rtol=1e-6)


def test_class_axis_and_traced_options():
    x, labels = make(5, (3, 4), 19)
    x = jnp.moveaxis(x, -1, 1)  # (3, 19, 4), class axis 1

    def loss(x, ls, zl, **kw):
        return jaxent.cross_entropy(x, labels, axis=1, label_smoothing=ls, z_loss=zl, **kw)

    args = (x, jnp.asarray(0.1, F32), jnp.asarray(1e-3, F32))
    np.testing.assert_allclose(pallas(loss, *args), xla(loss, *args), rtol=1e-6)


def test_vmap_and_jit():
    x, labels = make(6, (3, 5), 21)

    def f(x, y, implementation):
        loss = lambda x, y: jaxent.cross_entropy(x, y, implementation=implementation)  # noqa: E731
        return jax.jit(jax.vmap(loss))(x, y)

    np.testing.assert_allclose(pallas(f, x, labels), xla(f, x, labels), rtol=1e-6)


def test_grad_of_vmap_over_labels_only_equals_loop():
    """Shared logits, batched labels: the kernel's custom_vjp returns its sums as one
    array, so the logits-only sum s is batched with the label's terms."""
    x, _ = make(9, (5,), 21)
    many = jax.random.randint(jax.random.PRNGKey(10), (3, 5), 0, 21)

    def loss(x, y, implementation):
        return jaxent.cross_entropy(x, y, label_smoothing=0.1, implementation=implementation)

    def grad_of_vmap(x, implementation):
        def total(x):
            return jnp.sum(jax.vmap(lambda y: loss(x, y, implementation))(many))

        return jax.grad(total)(x)

    got = pallas(grad_of_vmap, x)
    want = sum(jax.grad(loss)(x, y, "xla") for y in many)
    assert oracles.rel_err(got, want) < 1e-6


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (CI simulates 8 CPUs)")
def test_vocab_sharded_equals_single_device():
    """Each shard's kernel (the GPU's or the TPU's) gives local statistics;
    `combine_shards` merges them. (The Pallas interpreter needs check_vma=False inside
    shard_map; compiled kernels do not, see tests/pallas/test_lowering.py.)"""
    mesh = jax.make_mesh((2,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    x, labels = make(7, (6,), 40)
    x = x.at[0, :20].add(-400.0)  # shard 0's max is far below the global max
    kw = dict(label_smoothing=0.1, z_loss=1e-3, return_aux=True)

    def sharded(x, **impl):
        body = lambda x: jaxent.cross_entropy(x, labels, vocab_axis_name="v", **kw, **impl)  # noqa: E731
        run = jax.shard_map(body, mesh=mesh, in_specs=P(None, "v"), out_specs=P(), check_vma=False)
        return jax.jit(jax.value_and_grad(run, has_aux=True))(x)

    with kernel_mode(**TILES):
        got = sharded(x, implementation="pallas")
    want = sharded(x, implementation="xla")
    assert_tree_close(got, want, rtol=1e-5)
    single = jaxent.cross_entropy(x, labels, **kw)
    np.testing.assert_allclose(got[0][0], single[0], rtol=1e-6)
    np.testing.assert_allclose(got[0][1].accuracy, single[1].accuracy, rtol=1e-6)
