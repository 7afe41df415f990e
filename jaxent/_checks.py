"""Trace-time argument validation.

Everything here runs on shapes, dtypes and Python values only, so it works on
tracers and never touches array values. Each error names the argument, what was
expected and what was given, and where possible how to fix it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._sharding import axis_names

REDUCTIONS = ("none", "sum", "mean")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _dtype(x: Any) -> np.dtype:
    return jnp.result_type(x)


def check_floating(name: str, x: Any) -> jax.Array:
    """Return `x` as an array, raising TypeError unless its dtype is floating."""
    if not hasattr(x, "dtype") and not isinstance(x, (list, tuple, float, int, np.number)):
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")
    given = x
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        given = given.dtype if hasattr(given, "dtype") else np.asarray(given).dtype
        raise TypeError(  # the dtype passed: JAX's x32 conversion would turn float64 to 32
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {given}. Cast it with `{name}.astype(jnp.float32)`."
        )
    return x


def check_integer(name: str, x: Any) -> jax.Array:
    """Return `x` as a 32-bit (or 64-bit) signed integer array, raising TypeError unless
    its dtype is integer.

    Narrow and unsigned ids are widened first: compared in int8 or uint8, a Python
    `ignore_index` or class count would wrap (-100 becomes 156 in uint8) and class ids
    above 127 would overflow. Unsigned ids too large for the signed type are clipped to
    its maximum rather than wrapped (uint32 4294967196 would become -100, an
    `ignore_index`): still outside [0, C), so their loss is NaN.
    """
    if not hasattr(x, "dtype") and not isinstance(x, (list, tuple, int, np.integer)):
        raise TypeError(f"`{name}` must be an integer array, got {type(x).__name__}.")
    if not isinstance(x, jax.Array):
        x = _host_ids(np.asarray(x))
    given = x.dtype  # before JAX's x32 conversion (float64 would read as float32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must have an integer dtype (class ids), got {given}. "
            "For probability targets use `soft_cross_entropy`."
        )
    wide = jnp.dtype(jnp.int64 if x.dtype.itemsize == 8 else jnp.int32)
    if x.dtype == wide:
        return x
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger) and x.dtype.itemsize >= wide.itemsize:
        x = jnp.minimum(x, np.iinfo(wide).max)
    return x.astype(wide)


def _host_ids(x: np.ndarray) -> np.ndarray:
    """64-bit host ids without 64-bit JAX (the default): `jnp.asarray` would wrap them to
    int32 (2**32 + 1 becomes class 1). Clipped to the int32 range instead, they stay
    outside [0, C). (Inside `jit` JAX converts them at the boundary, before jaxent.)"""
    if x.dtype.kind not in "iu" or x.dtype.itemsize < 8 or jax.config.jax_enable_x64:
        return x
    info = np.iinfo(np.int32)
    return np.clip(x, info.min, info.max).astype(np.int32)  # uint64: no negatives to clip


def check_num_classes(name: str, num_classes: int, where: str) -> None:
    """At least one class: an empty class axis has no log-sum-exp."""
    if num_classes < 1:
        raise ValueError(f"`{name}` must have at least one class ({where}), got 0.")


def check_axis(axis: Any, ndim: int, name: str = "logits") -> int:
    """Normalise `axis` to a non-negative int for an array of rank `ndim`."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`axis` must be an int, got {axis!r} ({type(axis).__name__}).")
    if ndim == 0:
        raise ValueError(f"`{name}` must have at least 1 dimension (the class axis), got a scalar.")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`axis` must be in [{-ndim}, {ndim}) for `{name}` of rank {ndim}, got {axis}."
        )
    return int(axis) % ndim


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


def check_shape(name: str, x: Any, expected: tuple[int, ...], hint: str = "") -> None:
    if _shape(x) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape {tuple(expected)}, got {_shape(x)}."
            + (f" {hint}" if hint else "")
        )


def check_bool_mask(name: str, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be a boolean mask, got dtype {x.dtype}. Use `{name} != 0`.")
    return x


def is_python_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_scalar_option(
    name: str, value: Any, *, low: float, high: float | None = None
) -> tuple[float | None, jax.Array | None]:
    """Split a schedulable scalar option into (static float, dynamic array).

    A Python number is checked against [low, high] now and returned as the static
    part; an array must be a floating scalar and is returned as the dynamic part
    (its range is enforced at run time by making the loss NaN, see `_stable`).
    """
    if is_python_number(value):
        value = float(value)
        if not (value >= low and (high is None or value <= high) and np.isfinite(value)):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"`{name}` must be a finite number {bounds}, got {value}.")
        return value, None
    if isinstance(value, bool) or not hasattr(value, "shape"):
        raise TypeError(f"`{name}` must be a float or a scalar array, got {type(value).__name__}.")
    if _shape(value) != ():
        raise ValueError(f"`{name}` must be a scalar, got an array of shape {_shape(value)}.")
    if not jnp.issubdtype(_dtype(value), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got dtype {_dtype(value)}.")
    return None, jnp.asarray(value)


def check_positive_or_none(name: str, value: Any, none_ok: bool = True) -> float | None:
    """Static options such as `softcap` (None: off) and `temperature` (`none_ok=False`):
    a Python float > 0."""
    alternative = " or None" if none_ok else ""
    if value is None and none_ok:
        return None
    if not is_python_number(value):
        raise TypeError(
            f"`{name}` must be a Python float > 0{alternative}, got {type(value).__name__}."
        )
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number > 0{alternative}, got {value}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """A static flag such as `return_aux`: a Python bool (a truthy string is a mistake)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int or None, got {value}.")
    return int(value)


def check_block_size(value: Any, implementation: str | None) -> int | tuple[int, int] | None:
    """`block_size` of `linear_cross_entropy`: a positive int, or for "chunked" (and None,
    which runs it) a pair (tokens per block, tokens per sub-block) whose second entry
    divides the first."""
    if not isinstance(value, tuple):
        return check_positive_int_or_none("block_size", value)
    if len(value) != 2:
        raise ValueError(
            "`block_size` must be an int or a pair (tokens per block, tokens per "
            f"sub-block), got a tuple of {len(value)}: {value!r}."
        )
    if implementation not in (None, "chunked"):
        raise ValueError(
            "`block_size` may be a pair (tokens per block, tokens per sub-block) only for "
            f"implementation 'chunked' (or None); got {value!r} with {implementation!r}."
        )
    block, sub = (check_positive_int_or_none("block_size", v) for v in value)
    if block % sub:
        raise ValueError(
            f"`block_size` = (block, sub-block) needs the sub-block to divide the block, "
            f"got {value!r}."
        )
    return block, sub


def check_ignore_index(ignore_index: Any, labels: jax.Array | None = None) -> int | None:
    """An int or None; with `labels` (as `check_integer` returns them), one their dtype
    holds: it is compared with them on the device."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(
            f"`ignore_index` must be an int (e.g. -100) or None, got {ignore_index!r} "
            f"({type(ignore_index).__name__})."
        )
    if labels is not None:
        info = np.iinfo(labels.dtype)
        if not info.min <= ignore_index <= info.max:
            raise ValueError(
                f"`ignore_index` must lie in [{info.min}, {info.max}]: the labels are "
                f"compared with it as {labels.dtype}; got {ignore_index}."
            )
    return int(ignore_index)


def check_class_weights(
    class_weights: Any, num_classes: int, classes: str = "the class axis of `logits`"
) -> jax.Array | None:
    """The (C,) class weights, refusing differentiation (`no_gradient`)."""
    if class_weights is None:
        return None
    class_weights = check_floating("class_weights", class_weights)
    check_shape(
        "class_weights",
        class_weights,
        (num_classes,),
        f"It holds one weight per class (the size of {classes}).",
    )
    return no_gradient("class_weights", class_weights)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def no_gradient(name: str, value: jax.Array) -> jax.Array:
    """`value`, for an argument the losses do not differentiate: being differentiated
    (a tangent that is not a symbolic zero, in forward or reverse mode) raises a
    ValueError at trace time, where a silent zero gradient would train nothing (PyTorch
    likewise refuses the derivative of `weight`)."""
    return value


def _no_gradient_jvp(name, primals, tangents):
    (value,), (tangent,) = primals, tangents
    if not isinstance(tangent, jax.custom_derivatives.SymbolicZero):
        raise ValueError(
            f"`{name}` cannot be differentiated: jaxent's losses take it as a constant (as "
            f"PyTorch refuses the derivative of `weight`), and here it depends on what is "
            f"being differentiated. Pass `jax.lax.stop_gradient({name})` to use it as one."
        )
    return value, jnp.zeros_like(value)


no_gradient.defjvp(_no_gradient_jvp, symbolic_zeros=True)


def check_axis_name(name: str, value: Any) -> Any:
    """A mesh axis name (a str, or a tuple of str for a dimension split over several
    axes), bound where the loss is called; None means unsharded."""
    if value is None:
        return None
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a mesh axis name (str) or None, got {value!r}."
        ) from None
    names = axis_names((value,))
    if len(set(names)) != len(names):
        raise ValueError(f"`{name}={value!r}` names a mesh axis more than once.")
    for axis in names:
        try:
            lax.axis_size(axis)
        except NameError:
            raise ValueError(
                f"`{name}={value!r}`: mesh axis {axis!r} is not bound here. Axis names "
                "are for calls inside `jax.shard_map` (or `jax.pmap`) over that axis; "
                "under `jax.jit` with sharded inputs, pass none."
            ) from None
    return value


def check_axis_names(vocab_axis_name: Any, batch_axis_name: Any) -> dict:
    """Both axis-name arguments, checked; they may not share a mesh axis (one axis
    cannot split the classes and the positions at once)."""
    vocab = check_axis_name("vocab_axis_name", vocab_axis_name)
    batch = check_axis_name("batch_axis_name", batch_axis_name)
    shared = set(axis_names((vocab,))) & set(axis_names((batch,)))
    if shared:
        raise ValueError(
            f"`vocab_axis_name={vocab!r}` and `batch_axis_name={batch!r}` share the mesh "
            f"axes {sorted(shared)}; the classes and the positions must be split over "
            "different axes."
        )
    return dict(vocab_axis_name=vocab, batch_axis_name=batch)


def check_implementation(implementation: Any, choices: tuple) -> str | None:
    """`implementation=`: one of `choices` (None picks the best for the backend)."""
    if (implementation is None or isinstance(implementation, str)) and implementation in choices:
        return implementation
    raise ValueError(f"`implementation` must be one of {choices}, got {implementation!r}.")
