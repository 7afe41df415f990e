"""XLA's one-read reduction (`jaxent._one_read`) against float64 NumPy written from the
sums' definitions, and where the default path takes it. (Through the public losses, with
every option and their derivatives, it runs in tests/pallas: test_row_stats.py,
test_cross_entropy.py, test_soft_cross_entropy.py, as the kernels' third engine.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxent
from benchmarks import hlo
from jaxent._one_read import online_reduce

from . import oracles

F32 = jnp.float32


def edge_logits(n, c, seed=0):
    """Random logits with dropped (-inf) entries, a row with nothing kept, a NaN, a
    +inf, a row far below -88 (where exp(0 - m) overflows) and tied maxima."""
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n, c), F32)) * 4
    x[0, 1] = -np.inf
    x[1] = -np.inf
    x[2, c - 1] = np.nan
    x[3] -= 300.0
    x[4] = 1.0
    x[4, c // 2 :] = 2.0
    x[5, 0] = np.inf
    return x


def numpy_reduce(z, b, p):
    """(max, Σ e^(z-max), Σ b, Σ b (max - z), Σ p) per row, float64, from the
    definitions; kept = z > -inf."""
    z = z.astype(np.float64)
    kept = z > -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(z, axis=-1)
        shift = np.where(np.isneginf(m), 0, m)[:, None]
        s = np.sum(np.where(kept, np.exp(np.where(kept, z, 0) - shift), 0), axis=-1)
        below = np.sum(np.where(kept, b * (shift - np.where(kept, z, 0)), 0), axis=-1)
    return m, s, np.sum(b, axis=-1), below, np.sum(p, axis=-1)


@pytest.mark.parametrize("n,c", [(6, 3), (9, 37), (6, 1000)])
def test_online_reduce_matches_numpy(n, c):
    z = edge_logits(n, c)
    kept = z > -np.inf
    b = np.where(kept, np.asarray(jax.random.uniform(jax.random.PRNGKey(1), z.shape)), 0)
    p = kept.astype(np.float32)
    s0 = np.where(z == np.inf, np.nan, kept.astype(np.float32))
    best, s, pairs, plain = jax.jit(online_reduce)(z, s0, {"b": b}, {"p": p})
    want = numpy_reduce(z, b, p)
    got = (best, s, pairs["b"][0], pairs["b"][1], plain["p"])
    for a, w in zip(got, want, strict=True):
        # Row 5 holds +inf: its s is NaN (checked), the rest of it is moot.
        a, w = np.delete(np.asarray(a, np.float64), 5), np.delete(w, 5)
        np.testing.assert_allclose(a, w, rtol=2e-6, atol=1e-6)
    assert np.isnan(s[5])


def test_nan_and_plus_inf_make_the_row_nan_and_empty_rows_stay_zero():
    z = edge_logits(6, 5)
    s0 = np.where(z == np.inf, np.nan, (z > -np.inf).astype(np.float32))
    best, s, _, _ = online_reduce(jnp.asarray(z), jnp.asarray(s0), {}, {})
    assert np.isnan(s[2]) and np.isnan(best[2])  # a NaN logit
    assert np.isnan(s[5]) and best[5] == np.inf  # +inf: NaN, as exp(inf - inf) in two reads
    assert s[1] == 0 and best[1] == -np.inf  # nothing kept
    assert s[3] > 0 and np.isfinite(s[3])  # far below -88


def test_losses_on_the_one_read_path_match_numpy():
    """`categorical_rows` / `soft_rows` with the one-read statistics, every option: the
    loss against the float64 oracle, the gradient against the two-read XLA path."""
    from jaxent import _stable
    from jaxent.pallas.row_stats import kernel_soft_stats, kernel_stats

    x = jax.random.normal(jax.random.PRNGKey(2), (8, 13), F32) * 3
    labels = jnp.arange(8) % 13
    w = jax.random.uniform(jax.random.PRNGKey(3), (13,), F32, 0.2, 2.0)
    opts = dict(class_weights=w, label_smoothing=0.2, z_loss=1e-2, softcap=4.0)
    one = functools.partial(kernel_stats, xla=True)

    def loss(stats, x):
        return jnp.sum(_stable.categorical_rows(x, labels, stats=stats, **opts).loss)

    want = oracles.cross_entropy(x, labels, reduction="sum", **opts)[0]
    assert oracles.rel_err(loss(one, x), want) < 1e-6
    got_grad = jax.grad(functools.partial(loss, one))(x)
    want_grad = jax.grad(functools.partial(loss, _stable.logit_stats))(x)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)

    t = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), (8, 13)))

    def soft(stats, x):
        return jnp.sum(_stable.soft_rows(x, t, stats=stats, **opts).loss)

    soft_one = functools.partial(kernel_soft_stats, xla=True)
    want = oracles.soft_cross_entropy(x, t, reduction="sum", **opts)
    assert oracles.rel_err(soft(soft_one, x), want) < 1e-6
    np.testing.assert_allclose(
        jax.grad(functools.partial(soft, soft_one))(x),
        jax.grad(functools.partial(soft, _stable.soft_stats))(x),
        rtol=1e-5,
        atol=1e-6,
    )


def logits_reductions(mlir: str, c: int) -> list[str]:
    """The `stablehlo.reduce` lines of a module that reduce a (64, c) array."""
    return [line for line in mlir.splitlines() if "stablehlo.reduce" in line and f"64x{c}x" in line]


@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy"])
def test_default_reads_the_logits_once_off_cpu_and_cuda(loss):
    """Lowered for a TPU, the default forward reduces the logits in one variadic
    reduction (a `stablehlo.reduce` with several operands) and takes no separate max;
    lowered for CPU it keeps the two reductions (max, then the sums)."""
    c = 1000
    fn = getattr(jaxent, loss)
    args = [jax.ShapeDtypeStruct((64, c), jnp.bfloat16)]
    args.append(jax.ShapeDtypeStruct((64,), jnp.int32) if loss == "cross_entropy" else args[0])
    step = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, label_smoothing=0.1, softcap=30.0)))
    tpu = logits_reductions(export.export(step, platforms=["tpu"])(*args).mlir_module(), c)
    cpu = logits_reductions(export.export(step, platforms=["cpu"])(*args).mlir_module(), c)
    assert len(tpu) == 1 and "), (" in tpu[0], tpu  # (operand init: ...), (operand init: ...)
    assert not any("maximum" in line for line in tpu)
    assert any("stablehlo.maximum" in line for line in cpu) and not any("), (" in x for x in cpu)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CI simulates 8 CPUs)")
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_xla_partitions_the_one_read_reduction_exactly(mesh_shape):
    """Where XLA partitions a loss over Auto mesh axes, CUDA takes this reduction
    instead of the kernel (`_sharding.xla_partitions`): split over classes it reduces
    each device's block and then combines the partial results with the same online
    log-sum-exp combiner. The loss, aux and gradient equal the unsplit call's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxent import _stable
    from jaxent.pallas.row_stats import kernel_stats

    n, c = 16, 1024
    x = jnp.asarray(edge_logits(n, c, seed=5))
    x = x.at[2, c - 1].set(0.0).at[5, 0].set(0.0)  # finite rows: compare the gradient too
    labels = (jnp.arange(n) * 97) % c
    w = jax.random.uniform(jax.random.PRNGKey(6), (c,), F32, 0.2, 2.0)
    opts = dict(class_weights=w, label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    one = functools.partial(kernel_stats, xla=True)

    @jax.jit
    def step(x, labels, w):
        def loss(x):
            rows = _stable.categorical_rows(x, labels, stats=one, **dict(opts, class_weights=w))
            kept = jnp.isfinite(rows.loss)
            return jnp.sum(jnp.where(kept, rows.loss, 0)), rows

        return jax.value_and_grad(loss, has_aux=True)(x)

    (want, want_rows), want_grad = step(x, labels, w)
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh(mesh_shape, ("batch", "vocab"), axis_types=(auto, auto))
    placed = [
        jax.device_put(a, NamedSharding(mesh, spec))
        for a, spec in ((x, P("batch", "vocab")), (labels, P("batch")), (w, P("vocab")))
    ]
    (got, got_rows), got_grad = step(*placed)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for field in ("loss", "lse", "correct"):
        np.testing.assert_allclose(getattr(got_rows, field), getattr(want_rows, field), rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    # Per-position partial results cross devices, never the logits.
    found = hlo.collectives(step.lower(*placed).compile().as_text())
    assert found and all(c.bytes <= 64 * n for c in found), found
