"""Softmax cross-entropy: `cross_entropy` (integer labels) and `soft_cross_entropy`.

The public functions validate their arguments at trace time (`_checks`), then call
one jit-compiled core whose option values that are Python numbers are static, so
an eager call is one compiled dispatch and new array values never retrace. The
formulas live in `_stable.categorical_rows` / `_stable.soft_rows`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._reduce import global_sum, reduce_loss, safe_divide
from ._sharding import CLASSES, LOGITS, POSITIONS, WHERE, manual_if_explicit, xla_partitions
from ._stable import Rows, categorical_rows, soft_rows
from .pallas import choose, stats_for


class CrossEntropyAux(NamedTuple):
    """Side outputs of a categorical loss (`return_aux=True`).

    lse: (positions) log-sum-exp of the (capped, masked) logits, float32;
    z_loss: the z-loss part of the loss, reduced like the loss;
    accuracy: Σ_n v_n w[y_n] [argmax_c z[n,c] == y_n] / Σ_n v_n w[y_n] (0 if empty;
        for `soft_cross_entropy`, agreement of argmax z with argmax of the targets);
    num_valid: Σ_n v_n (float32, as every aux value; float64 for float64 logits);
    weight_sum: Σ_n v_n w[y_n] — the "mean" denominator,
        what gradient accumulation over micro-batches needs with `reduction="sum"`.
    """

    lse: jax.Array
    z_loss: jax.Array
    accuracy: jax.Array
    num_valid: jax.Array
    weight_sum: jax.Array


def split_where(where: Any, logits_shape: tuple, positions_shape: tuple, axis: int):
    """Classify `where` as a positions mask or a logits mask; return its kind."""
    if where is None:
        return None
    where = _checks.check_bool_mask("where", where)
    shape = tuple(where.shape)
    for kind, target in (("logits", logits_shape), ("positions", positions_shape)):
        if len(shape) == len(target):
            try:
                if np.broadcast_shapes(shape, target) == tuple(target):
                    return kind
            except ValueError:
                pass
    raise ValueError(
        f"`where` must be broadcastable to the positions' shape {tuple(positions_shape)} "
        f"(drops positions) or to the logits' shape {tuple(logits_shape)} (drops logits), "
        f"with the same number of dimensions (size-1 axes broadcast), got {shape}. "
        "Add the missing axes explicitly, e.g. `where[None]`."
    )


def masks_class_last(where, where_kind, logits_shape, axis):
    """Broadcast `where` and move it to class-axis-last layout."""
    if where_kind is None:
        return None, None
    if where_kind == "positions":
        positions = logits_shape[:axis] + logits_shape[axis + 1 :]
        return None, jnp.broadcast_to(where, positions)
    return jnp.moveaxis(jnp.broadcast_to(where, logits_shape), axis, -1), None


def aux_from_rows(rows: Rows, z_loss: jax.Array, batch_axis_name) -> CrossEntropyAux:
    weight_sum = global_sum(rows.weight, batch_axis_name)
    return CrossEntropyAux(
        lse=rows.lse,
        z_loss=z_loss,
        accuracy=safe_divide(global_sum(rows.correct, batch_axis_name), weight_sum),
        num_valid=global_sum(rows.valid.astype(weight_sum.dtype), batch_axis_name),
        weight_sum=weight_sum,
    )


def finish(rows: Rows, reduction: str, return_aux: bool, batch_axis_name):
    """Reduce per-position rows into the loss (and aux) the caller asked for."""
    loss = reduce_loss(rows.loss, rows.weight, reduction, batch_axis_name, rows.valid)
    if not return_aux:
        return loss
    z_loss = reduce_loss(rows.z_loss, rows.weight, reduction, batch_axis_name, rows.valid)
    return loss, aux_from_rows(rows, z_loss, batch_axis_name)


def resolve(static: float | None, dynamic: jax.Array | None):
    return static if dynamic is None else dynamic


IMPLEMENTATIONS = (None, "xla", "pallas")

_STATIC = (
    "axis",
    "where_kind",
    "ignore_index",
    "softcap",
    "reduction",
    "return_aux",
    "label_smoothing_static",
    "z_loss_static",
    "vocab_axis_name",
    "batch_axis_name",
    "kernel",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
@manual_if_explicit(LOGITS, POSITIONS, WHERE, CLASSES)  # explicitly sharded inputs: shard_map
def _cross_entropy(
    logits,
    labels,
    where,
    class_weights,
    label_smoothing,
    z_loss,
    *,
    axis,
    where_kind,
    ignore_index,
    softcap,
    reduction,
    return_aux,
    label_smoothing_static,
    z_loss_static,
    vocab_axis_name,
    batch_axis_name,
    kernel,
):
    logit_mask, position_mask = masks_class_last(where, where_kind, logits.shape, axis)
    rows = categorical_rows(
        jnp.moveaxis(logits, axis, -1),
        labels,
        logit_mask=logit_mask,
        position_mask=position_mask,
        ignore_index=ignore_index,
        class_weights=class_weights,
        label_smoothing=resolve(label_smoothing_static, label_smoothing),
        z_loss=resolve(z_loss_static, z_loss),
        softcap=softcap,
        vocab_axis_name=vocab_axis_name,
        with_argmax=return_aux,
        # Asked here, after manual_if_explicit: under its shard_map the axes are Manual.
        stats=stats_for(kernel, partitioned=xla_partitions(logits, labels, where, class_weights)),
    )
    return finish(rows, reduction, return_aux, batch_axis_name)


def check_common(
    logits,
    axis,
    where,
    class_weights,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    vocab_axis_name,
    batch_axis_name,
    implementation,
):
    """Validation shared by the categorical losses; returns normalised options."""
    logits = _checks.check_floating("logits", logits)
    axis = _checks.check_axis(axis, logits.ndim)
    _checks.check_num_classes("logits", logits.shape[axis], f"shape {logits.shape}, axis {axis}")
    positions = logits.shape[:axis] + logits.shape[axis + 1 :]
    where_kind = split_where(where, logits.shape, positions, axis)
    return dict(
        logits=logits,
        axis=axis,
        positions=positions,
        where=None if where is None else jnp.asarray(where),
        where_kind=where_kind,
        class_weights=_checks.check_class_weights(class_weights, logits.shape[axis]),
        label_smoothing=_checks.check_scalar_option(
            "label_smoothing", label_smoothing, low=0.0, high=1.0
        ),
        z_loss=_checks.check_scalar_option("z_loss", z_loss, low=0.0),
        softcap=_checks.check_positive_or_none("softcap", softcap),
        reduction=_checks.check_reduction(reduction),
        **_checks.check_axis_names(vocab_axis_name, batch_axis_name),
        implementation=_checks.check_implementation(implementation, IMPLEMENTATIONS),
    )


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    ignore_index: int | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    return_aux: bool = False,
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Softmax cross-entropy with integer labels (PyTorch `F.cross_entropy` semantics).

    .. math::

        z = s \tanh(x / s), \quad lp_{n,c} = z_{n,c} - \log\textstyle\sum_c e^{z_{n,c}}

        l_n = v_n \big[(1-\varepsilon) w_{y_n} (-lp_{n,y_n})
              + \tfrac{\varepsilon}{C} \textstyle\sum_c w_c (-lp_{n,c})
              + \lambda_z w_{y_n} \mathrm{lse}_n^2 \big]

    Args:
      logits: (..., C, ...) floating; the class axis is `axis`.
      labels: integer class ids, `logits.shape` without `axis`.
      axis: the class axis of `logits`.
      where: bool, labels-shaped (False drops a position) or logits-shaped (False
        drops a logit from the log-sum-exp, the smoothing and the gradient).
      ignore_index: positions whose label equals it are dropped (e.g. -100).
      class_weights: (C,) per-class weight w (PyTorch's `weight`), a constant:
        differentiating through it raises a ValueError (`_checks.no_gradient`).
      label_smoothing: ε in [0, 1], spread as ε/C over the kept classes.
      z_loss: λ_z >= 0, coefficient of lse² (PaLM's auxiliary z-loss).
      softcap: s > 0 caps logits smoothly to (-s, s) before everything else.
      reduction: "none" (positions shape), "sum", or "mean" = Σ l_n / Σ v_n w[y_n]
        (0 when nothing is valid).
      return_aux: also return a `CrossEntropyAux`.
      vocab_axis_name / batch_axis_name: mesh axes over which the class axis / the
        positions are split, inside `shard_map` (see the README, "Sharding").
      implementation: None (the Pallas kernel on CUDA GPUs, XLA's one-read reduction
        on other accelerators, XLA's two reads on CPU), "xla" (two reads everywhere:
        the reference), or "pallas" (the backend's kernel: Triton on a GPU, Mosaic on
        a TPU; `NotImplementedError` where none can serve: CPU, float64 logits). All
        write the gradient in one pass (README, "Backends").

    Returns:
      The loss in float32 (float64 for float64 logits), or `(loss, aux)`.

    `-inf` logits are dropped logits (no probability, no gradient, not counted in C);
    the loss is +inf only when the label points at one. A label outside [0, C) that
    is not `ignore_index` makes its position's loss NaN (`jaxent.validate` raises
    instead).

    Differentiate with reverse mode (`jax.grad`, `jax.vjp`): the backward is a
    hand-written one-pass `custom_vjp`. Second derivatives work (`jax.hessian`,
    `jax.jvp` of `jax.grad`); forward mode on the loss itself (`jax.jvp(loss)`,
    `jax.jacfwd(loss)`) does not, as for any `custom_vjp`.

    Example:
      >>> loss = jaxent.cross_entropy(logits, labels, ignore_index=-100,
      ...                             label_smoothing=0.1)
    """
    opts = check_common(
        logits,
        axis,
        where,
        class_weights,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        vocab_axis_name,
        batch_axis_name,
        implementation,
    )
    labels = _checks.check_integer("labels", labels)
    _checks.check_shape(
        "labels",
        labels,
        opts["positions"],
        f"It must be `logits.shape` {tuple(opts['logits'].shape)} without the class axis "
        f"(axis={opts['axis']}).",
    )
    ignore_index = _checks.check_ignore_index(ignore_index, labels)
    return _cross_entropy(
        opts["logits"],
        labels,
        opts["where"],
        opts["class_weights"],
        opts["label_smoothing"][1],
        opts["z_loss"][1],
        axis=opts["axis"],
        where_kind=opts["where_kind"],
        ignore_index=ignore_index,
        softcap=opts["softcap"],
        reduction=opts["reduction"],
        return_aux=_checks.check_bool("return_aux", return_aux),
        label_smoothing_static=opts["label_smoothing"][0],
        z_loss_static=opts["z_loss"][0],
        vocab_axis_name=opts["vocab_axis_name"],
        batch_axis_name=opts["batch_axis_name"],
        kernel=choose(opts["implementation"], opts["logits"].dtype),
    )


@functools.partial(jax.jit, static_argnames=tuple(n for n in _STATIC if n != "ignore_index"))
@manual_if_explicit(LOGITS, LOGITS, WHERE, CLASSES)  # explicitly sharded inputs: shard_map
def _soft_cross_entropy(
    logits,
    targets,
    where,
    class_weights,
    label_smoothing,
    z_loss,
    *,
    axis,
    where_kind,
    softcap,
    reduction,
    return_aux,
    label_smoothing_static,
    z_loss_static,
    vocab_axis_name,
    batch_axis_name,
    kernel,
):
    logit_mask, position_mask = masks_class_last(where, where_kind, logits.shape, axis)
    rows = soft_rows(
        jnp.moveaxis(logits, axis, -1),
        jnp.moveaxis(targets, axis, -1),
        logit_mask=logit_mask,
        position_mask=position_mask,
        class_weights=class_weights,
        label_smoothing=resolve(label_smoothing_static, label_smoothing),
        z_loss=resolve(z_loss_static, z_loss),
        softcap=softcap,
        vocab_axis_name=vocab_axis_name,
        with_argmax=return_aux,
        stats=stats_for(
            kernel, soft=True, partitioned=xla_partitions(logits, targets, where, class_weights)
        ),
    )
    return finish(rows, reduction, return_aux, batch_axis_name)


def soft_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    return_aux: bool = False,
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Softmax cross-entropy with probability targets.

    .. math::

        t' = (1-\varepsilon) t + \varepsilon / C, \qquad
        l_n = v_n \big[-\textstyle\sum_c w_c t'_{n,c} lp_{n,c} + \lambda_z \mathrm{lse}_n^2\big]

    Args:
      logits: floating, class axis `axis`.
      targets: `logits.shape`, any floating dtype (distributions, or unnormalised).
      where, class_weights, label_smoothing, z_loss, softcap, axis, return_aux,
      vocab_axis_name, batch_axis_name, implementation: as in `cross_entropy`.
      reduction: "none", "sum", or "mean" over the number of valid positions
        (PyTorch's convention for probability targets; class weights do not enter
        the denominator).

    A dropped logit (`-inf` or masked) with zero target contributes 0; with a non-zero
    target the loss is +inf, with a NaN target NaN. Gradients flow to `targets` too (wrap them in
    `lax.stop_gradient` for a frozen teacher).
    """
    opts = check_common(
        logits,
        axis,
        where,
        class_weights,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        vocab_axis_name,
        batch_axis_name,
        implementation,
    )
    targets = _checks.check_floating("targets", targets)
    _checks.check_shape("targets", targets, opts["logits"].shape, "It must match `logits`.")
    return _soft_cross_entropy(
        opts["logits"],
        targets,
        opts["where"],
        opts["class_weights"],
        opts["label_smoothing"][1],
        opts["z_loss"][1],
        axis=opts["axis"],
        where_kind=opts["where_kind"],
        softcap=opts["softcap"],
        reduction=opts["reduction"],
        return_aux=_checks.check_bool("return_aux", return_aux),
        label_smoothing_static=opts["label_smoothing"][0],
        z_loss_static=opts["z_loss"][0],
        vocab_axis_name=opts["vocab_axis_name"],
        batch_axis_name=opts["batch_axis_name"],
        kernel=choose(opts["implementation"], opts["logits"].dtype),
    )
