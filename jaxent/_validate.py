"""Opt-in run-time check of label values.

The losses cannot raise on a bad label value inside `jit` (values do not exist at
trace time), so they make that position's loss NaN. `validate` turns the same
condition into an error: a `ValueError` on concrete arrays, or a `checkify` check
when called under tracing (wrap the step in `jax.experimental.checkify.checkify`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from . import _checks


def _bad_labels(labels, num_classes, ignore_index, where):
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    if where is not None:
        bad = bad & where
    return bad


def validate(
    labels: jax.Array,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    """Check that every label is in [0, num_classes) or equals `ignore_index`.

    Positions dropped by a labels-shaped `where` (size-1 axes broadcast, as in the
    losses) are not checked (padding may hold any label). Returns `labels` (values
    unchanged; narrow integer dtypes widened to int32, as every loss does), so it can
    be used inline:
    `cross_entropy(logits, jaxent.validate(labels, C, ignore_index=-100))`.

    Raises:
      ValueError (concrete arrays): naming the first bad position and its value.
      Under `jit`/tracing it adds a `checkify.check` with the same message instead;
      run the function through `checkify.checkify(...)` and call `err.throw()`.
      Under `jax.vmap` the message comes from one failing mapped slice (checkify's
      choice, not necessarily the first) and its position is within that slice.
    """
    given = labels
    labels = _checks.check_integer("labels", labels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"`num_classes` must be an int, got {type(num_classes).__name__}.")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
    ignore_index = _checks.check_ignore_index(ignore_index, labels)
    if where is not None:
        where = _checks.check_bool_mask("where", where)
        # As the losses take it: labels-shaped, size-1 axes broadcast.
        shape, target = tuple(where.shape), tuple(labels.shape)
        fits = len(shape) == len(target) and all(
            a in (1, b) for a, b in zip(shape, target, strict=True)
        )
        if not fits:
            raise ValueError(
                f"`where` must be broadcastable to the labels' shape {target}, with the same "
                f"number of dimensions (size-1 axes broadcast), got {shape}."
            )
        where = jnp.broadcast_to(where, target) if shape != target else where

    if labels.size == 0:
        return labels
    if isinstance(labels, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
        bad = _bad_labels(labels, num_classes, ignore_index, where)
        first = jnp.argmax(bad.ravel())
        position = jnp.stack(jnp.unravel_index(first, labels.shape)) if labels.ndim else first
        checkify.check(
            ~jnp.any(bad),
            f"jaxent.validate: label {{value}} at position {{position}} is outside "
            f"[0, {num_classes})"
            + (f" and is not ignore_index={ignore_index}" if ignore_index is not None else "")
            + ".",
            # A device array's ids as given (uint32 beyond int32, unclipped); host ids
            # may be 64-bit, which a 32-bit trace cannot hold: the checked values.
            value=(given if isinstance(given, jax.Array) else labels).ravel()[first],
            position=position,
        )
        return labels

    host_labels = np.asarray(given)  # the caller's dtype: uint ids reported unclipped
    bad = _bad_labels(
        host_labels, num_classes, ignore_index, None if where is None else np.asarray(where)
    )
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        count = int(bad.sum())
        extra = f" and is not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"`labels` has {count} value(s) outside [0, {num_classes}){extra}; the first is "
            f"{int(host_labels[position])} at position {position}."
        )
    return labels
