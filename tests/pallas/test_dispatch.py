"""`implementation=`: validation, where "pallas" cannot serve, and what None picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
import jaxent.pallas
from jaxent.pallas import interpret_mode

X = jnp.zeros((4, 10), jnp.float32)
Y = jnp.zeros((4,), jnp.int32)


def jaxpr(fn, **kw) -> str:
    return str(jax.make_jaxpr(lambda x, y: fn(x, y, **kw))(X, Y))


@pytest.mark.parametrize("fn", [jaxent.cross_entropy, jaxent.soft_cross_entropy])
@pytest.mark.parametrize("bad", ["triton", "XLA", 1])
def test_unknown_implementation_is_a_clear_error(fn, bad):
    y = Y if fn is jaxent.cross_entropy else X
    expected = r"`implementation` must be one of \(None, 'xla', 'pallas'\), got"
    with pytest.raises(ValueError, match=expected):
        fn(X, y, implementation=bad)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a kernel serves on GPU and TPU")
def test_pallas_on_a_cpu_says_why():
    expected = "lower for GPUs and TPUs, and the backend is 'cpu'"
    with pytest.raises(NotImplementedError, match=expected):
        jaxent.cross_entropy(X, Y, implementation="pallas")
    with pytest.raises(NotImplementedError, match=expected):
        jaxent.soft_cross_entropy(X, X, implementation="pallas")


def test_pallas_refuses_float64_even_when_interpreted():
    with interpret_mode(), pytest.raises(NotImplementedError, match="float64"):
        jaxent.cross_entropy(X.astype(jnp.float64), Y, implementation="pallas")
    loss = jaxent.cross_entropy(X.astype(jnp.float64), Y)  # None: XLA serves float64
    assert loss.dtype == jnp.float64


def test_default_is_platform_dependent_and_interpret_mode_is_its_own_cache_entry():
    """None outside interpret mode: the kernel only in the CUDA branch of a
    platform-dependent choice (CPU runs XLA); inside: the interpreted kernel. The mode
    is a static argument of the jitted core, so the two never share a compilation."""
    outside = jaxpr(jaxent.cross_entropy)
    assert "platform_index" in outside and "pallas_call" in outside
    with interpret_mode():
        inside = jaxpr(jaxent.cross_entropy)
    assert "platform_index" not in inside and "pallas_call" in inside
    assert "pallas_call" not in jaxpr(jaxent.cross_entropy, implementation="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 10), jnp.float32)
    want = jaxent.cross_entropy(x, Y, implementation="xla")
    np.testing.assert_allclose(jaxent.cross_entropy(x, Y), want, rtol=1e-6)
    with interpret_mode():
        np.testing.assert_allclose(jaxent.cross_entropy(x, Y), want, rtol=1e-6)


def test_without_pallas_everything_takes_xla(monkeypatch):
    monkeypatch.setattr(jaxent.pallas, "UNAVAILABLE", "no Pallas here")
    assert "pallas_call" not in jaxpr(jaxent.cross_entropy)
    with interpret_mode(), pytest.raises(NotImplementedError, match="no Pallas here"):
        jaxent.cross_entropy(X, Y, implementation="pallas")


def test_interpret_mode_checks_its_tiles():
    expected = "`block_classes` must be a power of two, got 24"
    with pytest.raises(ValueError, match=expected), interpret_mode(block_classes=24):
        pass
    for mode in (interpret_mode, jaxent.pallas.tiles):  # 0 passes the bit test (0 & -1 == 0)
        for bad in (0, -4):
            with pytest.raises(ValueError, match=f"power of two, got {bad}"), mode(block_rows=bad):
                pass


def test_tiles_context_keeps_the_platform_choice_and_checks_sizes():
    """`tiles` (for GPU sweeps) sets compiled tile sizes: the kernel is still chosen by
    platform, never interpreted, and "pallas" still refuses a CPU backend."""
    with jaxent.pallas.tiles(block_rows=32, block_classes=64):
        kernel = jaxent.pallas.choose(None, jnp.bfloat16)
        assert kernel == jaxent.pallas.Kernel(True, False, 32, 64, None, mosaic=False)
        if jax.default_backend() == "cpu":
            with pytest.raises(NotImplementedError, match="backend is 'cpu'"):
                jaxent.pallas.choose("pallas", jnp.bfloat16)
    expected = "`block_depth` must be a power of two, got 48"
    with pytest.raises(ValueError, match=expected), jaxent.pallas.tiles(block_depth=48):
        pass


def test_interpret_mode_for_tpu_runs_the_mosaic_kernel_through_the_public_losses():
    """`interpret_mode(platform="tpu")`: the losses take the TPU kernel (16-row x
    128-class blocks over 37 x 300 logits: ragged in both) with the whole wrapper and
    custom VJP, and equal the XLA path in value, aux and gradient for every option."""
    x = jax.random.normal(jax.random.PRNGKey(0), (37, 300), jnp.float32) * 3
    y = jax.random.randint(jax.random.PRNGKey(1), (37,), 0, 300).at[0].set(-100)
    t = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (37, 300)), axis=-1)
    weights = jax.random.uniform(jax.random.PRNGKey(3), (300,), jnp.float32, 0.2, 2.0)
    where = (jax.random.uniform(jax.random.PRNGKey(4), (37, 300)) > 0.2) | (t > 0.01)
    common = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, class_weights=weights)
    cases = [
        (jaxent.cross_entropy, y, dict(common, ignore_index=-100, where=where)),
        (jaxent.soft_cross_entropy, t, dict(common, where=where)),
    ]
    for fn, other, opts in cases:

        def run(implementation, fn=fn, other=other, opts=opts):
            def loss(x):
                return fn(x, other, implementation=implementation, return_aux=True, **opts)

            return jax.value_and_grad(loss, has_aux=True)(x)

        with interpret_mode(platform="tpu", block_rows=16, block_classes=128):
            traced = jax.make_jaxpr(lambda x: run("pallas"))(x)
            assert "jaxent_row_stats_tpu" in str(traced)
            got = run("pallas")
        want = run("xla")
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_interpret_mode_platform_is_checked():
    expected = "`platform` must be 'gpu' or 'tpu', got 'cpu'"
    with pytest.raises(ValueError, match=expected), interpret_mode(platform="cpu"):
        pass


def test_float16_on_tpu_is_refused_with_the_reason(monkeypatch):
    """Mosaic does not compile float16 vectors: "pallas" says so on a TPU (for both
    losses) instead of failing in the compiler; None keeps XLA there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    logits = jnp.zeros((4, 256), jnp.float16)
    x, w = jnp.zeros((4, 8), jnp.float16), jnp.zeros((256, 8), jnp.float16)
    with pytest.raises(NotImplementedError, match="float16 on a TPU"):
        jaxent.cross_entropy(logits, Y, implementation="pallas")
    with pytest.raises(NotImplementedError, match="float16 on a TPU"):
        jaxent.linear_cross_entropy(x, w, Y, implementation="pallas")
    assert jaxent.pallas.choose(None, jnp.float16) is not None  # auto: XLA off CUDA
