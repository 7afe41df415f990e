"""jaxent._checks: trace-time validation helpers."""

import jax.numpy as jnp
import pytest

from jaxent import _checks


def test_scalar_option_splits_static_and_dynamic():
    assert _checks.check_scalar_option("label_smoothing", 0.1, low=0.0, high=1.0) == (0.1, None)
    static, dynamic = _checks.check_scalar_option("z_loss", jnp.float32(0.5), low=0.0)
    assert static is None and dynamic.shape == ()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, r"`label_smoothing` must be \[0.0, 1.0\], got 1.5"),
        (jnp.ones(2), ValueError, r"`label_smoothing` must be a scalar, got an array of shape"),
        (jnp.int32(1), TypeError, r"`label_smoothing` must be floating"),
        ("0.1", TypeError, r"`label_smoothing` must be a float or a scalar array, got str"),
    ],
)
def test_scalar_option_errors(value, error, match):
    with pytest.raises(error, match=match):
        _checks.check_scalar_option("label_smoothing", value, low=0.0, high=1.0)


def test_axis_is_normalised_and_checked():
    assert _checks.check_axis(-1, 3) == 2
    with pytest.raises(ValueError, match=r"`axis` must be in \[-2, 2\) for `logits` of rank 2"):
        _checks.check_axis(2, 2)
    with pytest.raises(TypeError, match="`axis` must be an int"):
        _checks.check_axis(1.0, 2)
