"""jaxent.validate: the opt-in run-time label check."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

import jaxent


def test_valid_labels_pass_through():
    labels = jnp.array([[0, 3], [-100, 2]])
    assert jaxent.validate(labels, 4, ignore_index=-100) is labels


def test_names_first_bad_position_and_value():
    labels = jnp.array([[0, 3], [7, -2]])
    with pytest.raises(ValueError, match=r"2 value\(s\) outside \[0, 4\).*first is 7 at position"):
        jaxent.validate(labels, 4)


@pytest.mark.parametrize("jit", [False, True])
def test_narrow_dtypes_and_empty_labels(jit):
    """uint8 -100 would wrap to 156 and int8 100 is fine for C=200: both checked in a
    wide dtype, eagerly and under jit; empty labels have nothing to check."""

    def check(labels, c, **kw):
        fn = lambda y: jaxent.validate(y, c, **kw)  # noqa: E731
        if not jit:
            return fn(labels)
        err, _ = checkify.checkify(jax.jit(fn))(labels)
        err.throw()

    check(jnp.array([100, 5], jnp.int8), 200)
    with pytest.raises((ValueError, checkify.JaxRuntimeError), match="156"):
        check(jnp.array([156, 5], jnp.uint8), 100, ignore_index=-100)
    check(jnp.zeros((0,), jnp.int32), 5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("label", [-1, 0, 3, 4, 5])
def test_rejects_exactly_the_labels_the_losses_make_nan(jit, label):
    """The edges of [0, C) for C = 4: `validate` raises exactly where `cross_entropy`
    (the SPEC's run-time rule) makes the position's loss NaN; -100 is ignored by both."""
    labels = jnp.array([label, 1, -100])
    loss = jaxent.cross_entropy(jnp.zeros((3, 4)), labels, ignore_index=-100, reduction="none")
    fn = functools.partial(jaxent.validate, num_classes=4, ignore_index=-100)
    if jit:
        err, _ = checkify.checkify(jax.jit(fn))(labels)
        run = err.throw
    else:
        run = functools.partial(fn, labels)
    if not 0 <= label < 4:
        assert jnp.isnan(loss[0])
        with pytest.raises((ValueError, checkify.JaxRuntimeError), match=f"{label} at position"):
            run()
    else:
        assert jnp.isfinite(loss).all()
        run()


def test_where_excludes_padding():
    labels = jnp.array([1, 99, 2])
    jaxent.validate(labels, 3, where=jnp.array([True, False, True]))
    with pytest.raises(ValueError, match="99 at position"):
        jaxent.validate(labels, 3)


def test_where_broadcasts_as_in_the_losses():
    labels = jnp.array([[1, 99], [2, 0]])
    jaxent.validate(labels, 3, where=jnp.array([[True, False], [True, True]]))
    with pytest.raises(ValueError, match=r"99 at position \(0, 1\)"):
        jaxent.validate(labels, 3, where=jnp.ones((2, 1), bool))  # (2, 1): every column
    jaxent.validate(labels, 3, where=jnp.array([[True, False]]))  # (1, 2): column 1 dropped
    with pytest.raises(ValueError, match=r"`where` must be broadcastable to the labels' shape"):
        jaxent.validate(labels, 3, where=jnp.ones((2,), bool))


@pytest.mark.parametrize("jit", [False, True])
def test_huge_unsigned_labels_are_reported_as_given(jit):
    """uint32 ids above int32's range are checked clipped, and reported unclipped."""
    labels = jnp.array([0, 4294967196], jnp.uint32)
    fn = functools.partial(jaxent.validate, num_classes=5)
    with pytest.raises((ValueError, checkify.JaxRuntimeError), match="4294967196"):
        if jit:
            checkify.checkify(jax.jit(fn))(labels)[0].throw()
        else:
            fn(labels)


def test_under_jit_with_checkify():
    @jax.jit
    def step(labels):
        return jaxent.cross_entropy(jnp.zeros((3, 4)), jaxent.validate(labels, 4))

    checked = checkify.checkify(step)
    err, _ = checked(jnp.array([0, 1, 2]))
    err.throw()  # no error
    err, loss = checked(jnp.array([0, 5, 2]))
    assert jnp.isnan(loss)
    with pytest.raises(Exception, match=r"label 5 at position \[1\] is outside \[0, 4\)"):
        err.throw()


def test_argument_errors():
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        jaxent.validate(jnp.zeros(3), 4)
    with pytest.raises(ValueError, match="`num_classes` must be >= 1"):
        jaxent.validate(jnp.zeros(3, int), 0)
    # Compared with int32 labels, 2**31 made checkify's jit fail with an OverflowError.
    with pytest.raises(ValueError, match=r"`ignore_index` must lie in .* as int32"):
        jaxent.validate(jnp.zeros(3, jnp.int32), 4, ignore_index=2**31)
