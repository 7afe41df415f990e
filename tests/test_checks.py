"""jaxent._checks: trace-time validation helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxent
from jaxent import _checks


def test_scalar_option_splits_static_and_dynamic():
    assert _checks.check_scalar_option("label_smoothing", 0.1, low=0.0, high=1.0) == (0.1, None)
    static, dynamic = _checks.check_scalar_option("z_loss", jnp.float32(0.5), low=0.0)
    assert static is None and dynamic.shape == ()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, r"`label_smoothing` must be a finite number in \[0.0, 1.0\], got 1.5"),
        (jnp.ones(2), ValueError, r"`label_smoothing` must be a scalar, got an array of shape"),
        (jnp.int32(1), TypeError, r"`label_smoothing` must be floating"),
        ("0.1", TypeError, r"`label_smoothing` must be a float or a scalar array, got str"),
    ],
)
def test_scalar_option_errors(value, error, match):
    with pytest.raises(error, match=match):
        _checks.check_scalar_option("label_smoothing", value, low=0.0, high=1.0)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5])
def test_unbounded_scalar_options_must_be_finite_and_above_low(value):
    """`z_loss` has no upper bound, so only the finiteness check stops inf (and the
    ordered comparison NaN)."""
    with pytest.raises(ValueError, match=r"`z_loss` must be a finite number >= 0.0, got"):
        _checks.check_scalar_option("z_loss", value, low=0.0)


def test_axis_is_normalised_and_checked():
    assert _checks.check_axis(-1, 3) == 2
    with pytest.raises(ValueError, match=r"`axis` must be in \[-2, 2\) for `logits` of rank 2"):
        _checks.check_axis(2, 2)
    with pytest.raises(TypeError, match="`axis` must be an int"):
        _checks.check_axis(1.0, 2)


LOSS_CALLS = {
    "cross_entropy": lambda **kw: jaxent.cross_entropy(jnp.zeros((4, 8)), jnp.zeros(4, int), **kw),
    "soft_cross_entropy": lambda **kw: jaxent.soft_cross_entropy(
        jnp.zeros((4, 8)), jnp.full((4, 8), 0.125), **kw
    ),
    "binary_cross_entropy": lambda **kw: jaxent.binary_cross_entropy(
        jnp.zeros((4, 8)), jnp.zeros((4, 8)), **kw
    ),
    "focal_loss": lambda **kw: jaxent.focal_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)), **kw),
    "kl_divergence": lambda **kw: jaxent.kl_divergence(jnp.zeros((4, 8)), jnp.zeros((4, 8)), **kw),
    "linear_cross_entropy": lambda **kw: jaxent.linear_cross_entropy(
        jnp.zeros((4, 3)), jnp.zeros((8, 3)), jnp.zeros(4, int), **kw
    ),
}


@pytest.mark.parametrize("loss", sorted(LOSS_CALLS))
def test_axis_names_are_checked(loss):
    """An unbound axis name (outside shard_map, or a typo) and one axis named for both
    the classes and the positions raise ValueErrors naming the arguments."""
    call = LOSS_CALLS[loss]
    with pytest.raises(ValueError, match=r"`vocab_axis_name='vocab'`: mesh axis 'vocab' is not"):
        call(vocab_axis_name="vocab")
    with pytest.raises(ValueError, match=r"`batch_axis_name=\('b', 'x'\)`: mesh axis 'b' is not"):
        call(batch_axis_name=("b", "x"))
    with pytest.raises(TypeError, match=r"`batch_axis_name` must be a mesh axis name"):
        call(batch_axis_name=["b"])
    with pytest.raises(ValueError, match=r"`vocab_axis_name=\('v', 'v'\)` names a mesh axis"):
        call(vocab_axis_name=("v", "v"))

    mesh = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(AxisType.Auto,) * 2)
    shared = jax.shard_map(
        lambda: call(vocab_axis_name="vocab", batch_axis_name=("batch", "vocab")),
        mesh=mesh,
        in_specs=(),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match=r"share the mesh axes \['vocab'\]"):
        shared()


ZERO_CLASSES = {
    "cross_entropy": lambda: jaxent.cross_entropy(jnp.zeros((4, 0)), jnp.zeros(4, int)),
    "soft_cross_entropy": lambda: jaxent.soft_cross_entropy(jnp.zeros((4, 0)), jnp.zeros((4, 0))),
    "kl_divergence": lambda: jaxent.kl_divergence(jnp.zeros((0, 4)), jnp.zeros((0, 4)), axis=0),
    "linear_cross_entropy": lambda: jaxent.linear_cross_entropy(
        jnp.zeros((4, 3)), jnp.zeros((0, 3)), jnp.zeros(4, int)
    ),
}


@pytest.mark.parametrize("loss", sorted(ZERO_CLASSES))
def test_an_empty_class_axis_is_refused(loss):
    with pytest.raises(ValueError, match=r"must have at least one class \(.*\), got 0"):
        ZERO_CLASSES[loss]()


def test_unsigned_labels_too_large_for_int32_are_clipped_not_wrapped():
    """uint32 4294967196 would wrap to -100 (an ignore_index) or 2**32 + 1 to 1 (a
    class): clipped to the int32 maximum they stay out of range."""
    labels = np.array([0, 4294967196, 4294967295], np.uint32)
    widened = _checks.check_integer("labels", labels)
    assert widened.dtype == jnp.int32
    np.testing.assert_array_equal(widened, [0, 2**31 - 1, 2**31 - 1])
    loss = jaxent.cross_entropy(jnp.zeros((3, 4)), labels, ignore_index=-100, reduction="none")
    assert loss[0] == pytest.approx(np.log(4)) and np.isnan(loss[1]) and np.isnan(loss[2])
    with pytest.raises(ValueError, match="4294967196"):
        jaxent.validate(labels, 4, ignore_index=-100)


def test_64_bit_host_labels_without_x64_are_clipped_not_wrapped():
    """Without 64-bit JAX (its default; the suite enables it) `jnp.asarray` would wrap an
    int64 id 2**32 + 1 to class 1: a silently finite loss."""
    labels = np.array([1, 2**32 + 1, -(2**40), 3], np.int64)
    with jax.enable_x64(False):
        widened = _checks.check_integer("labels", labels)
        loss = jaxent.cross_entropy(jnp.zeros((4, 5)), labels, reduction="none")
    assert widened.dtype == jnp.int32
    np.testing.assert_array_equal(widened, [1, 2**31 - 1, -(2**31), 3])
    loss = np.asarray(loss)
    assert np.isfinite(loss[[0, 3]]).all() and np.isnan(loss[[1, 2]]).all()


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_ignore_index_outside_the_labels_dtype_names_the_argument(loss):
    """Compared with int32 labels on the device, 2**31 would fail inside jit with an
    OverflowError that names no argument."""
    labels = jnp.array([0, 1], jnp.int32)
    if loss == "cross_entropy":
        call = lambda i: jaxent.cross_entropy(jnp.zeros((2, 3)), labels, ignore_index=i)
    else:
        call = lambda i: jaxent.linear_cross_entropy(
            jnp.zeros((2, 4)), jnp.zeros((3, 4)), labels, ignore_index=i
        )
    with pytest.raises(ValueError, match=r"`ignore_index` must lie in .* compared .* as int32"):
        call(2**31)
    assert np.isfinite(call(-(2**31)))
    assert np.isfinite(call(2**31 - 1))  # int32's largest: a clipped uint32 pad id


def test_dtype_errors_name_the_dtype_given_not_the_converted_one():
    """Without x64, JAX would turn NumPy float64 into float32 before the check."""
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match="`labels` must have an integer dtype .* got float64"):
            jaxent.cross_entropy(jnp.zeros((3, 4)), np.zeros(3))
        with pytest.raises(TypeError, match="`logits` must have a floating dtype .* got int64"):
            jaxent.cross_entropy(np.zeros((3, 4), np.int64), jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("loss", ["cross_entropy", "soft_cross_entropy", "linear_cross_entropy"])
def test_differentiating_class_weights_raises(loss):
    """A silent zero gradient would train nothing: differentiating through
    `class_weights` names them; stop_gradient makes them a constant again."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    labels = jnp.array([0, 1, 2, 3, 0, 1])
    w = jnp.array([1.0, 2.0, 0.5, 1.5])

    def f(w, x=x):
        if loss == "cross_entropy":
            return jaxent.cross_entropy(x, labels, class_weights=w)
        if loss == "soft_cross_entropy":
            return jaxent.soft_cross_entropy(x, jax.nn.softmax(x), class_weights=w)
        return jaxent.linear_cross_entropy(x, jnp.eye(4), labels, class_weights=w)

    for transform in (jax.grad, jax.jacfwd):
        with pytest.raises(ValueError, match=r"`class_weights` cannot be differentiated"):
            transform(f)(w)
    assert float(jax.grad(lambda w: f(jax.lax.stop_gradient(w)) + w.sum())(w)[0]) == 1.0
    # The logits' derivatives, first and second, are unaffected.
    g = jax.grad(lambda x: f(w, x))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
