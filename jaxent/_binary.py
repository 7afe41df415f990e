"""Sigmoid (multi-label) losses: `binary_cross_entropy` and `focal_loss`.

Both are elementwise over any shape and computed from logits through
softplus(x) = log(1 + e^x) = logaddexp(x, 0) (`jax.nn.softplus`), so saturated logits
never produce log(0). "mean" averages over the valid elements (those `where` keeps).
(Not as max(x, 0) + log1p(exp(-|x|)): JAX splits max's derivative at 0 but not |x|'s,
which made that form's derivative at x = 0 be 0 instead of σ(0) = 0.5.)

Infinite logits are their limits, not NaN: the loss is written as
t·softplus(-x) + (1-t)·softplus(x) with 0·inf counted as 0 (the convention
`soft_cross_entropy` uses for dropped logits), so x = +inf with t = 1 costs 0,
x = +inf with t < 1 costs +inf, and the gradient σ(x) - t stays finite.
(PyTorch's `BCEWithLogitsLoss` and optax give NaN there: inf - inf.)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.nn import softplus

from . import _checks
from ._reduce import reduce_loss
from ._sharding import elementwise_layout
from ._stable import compute_dtype, option_in


def _times(c: jax.Array, a: jax.Array) -> jax.Array:
    """c·a with 0·inf = 0. Only there is the derivative in c 0 (not NaN; its true value
    is infinite); elsewhere it is a, also where c is 0 (a target of exactly 0 or 1)."""
    return c * jnp.where((c == 0) & jnp.isinf(a), 0, a)


def _sigmoid_ce(x: jax.Array, t: jax.Array, p: jax.Array | float = 1.0) -> jax.Array:
    """p·t·softplus(-x) + (1-t)·softplus(x): BCE with positive weight p.

    For p = 1 this equals max(x, 0) - x·t + log1p(exp(-|x|)), summed as two
    non-negative terms (no cancellation when t ≈ 1 and x is large) and finite-or-+inf
    at x = ±inf.
    """
    return _times(p * t, softplus(-x)) + _times(1 - t, softplus(x))


def _check_broadcastable(name: str, x: Any, shape: tuple) -> jax.Array:
    x = jnp.asarray(x)
    try:
        ok = np.broadcast_shapes(x.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`{name}` must be broadcastable to the logits' shape {shape}, got {x.shape}."
        )
    return x


def _mesh_axes(vocab_axis_name, batch_axis_name):
    """Elementwise losses are split over both axes alike: sum over both for the mean."""
    names = tuple(n for n in (vocab_axis_name, batch_axis_name) if n is not None)
    return names or None


def _inputs(logits, targets, where):
    """Float32/64 logits and targets, with dropped elements zeroed so that a NaN or inf
    under a False `where` cannot reach the gradient, and the validity mask."""
    dtype = compute_dtype(logits.dtype)
    # ones_like keeps the logits' sharding: on Explicit mesh axes a plain `ones` is
    # replicated and JAX refuses to combine it with sharded logits.
    valid = jnp.ones_like(logits, bool) if where is None else jnp.broadcast_to(where, logits.shape)
    x = jnp.where(valid, logits.astype(dtype), 0)
    t = jnp.where(valid, targets.astype(dtype), 0)
    return x, t, valid


def _finish(loss, valid, reduction, axes):
    loss = jnp.where(valid, loss, 0)
    return reduce_loss(loss, valid.astype(loss.dtype), reduction, axes)


@functools.partial(jax.jit, static_argnames=("reduction", "smoothing_static", "axes"))
def _binary_cross_entropy(
    logits, targets, where, pos_weight, weights, smoothing, *, reduction, smoothing_static, axes
):
    logits, targets, where, pos_weight, weights = elementwise_layout(
        (logits, targets, where, pos_weight, weights), logits.shape
    )
    x, t, valid = _inputs(logits, targets, where)
    dtype = x.dtype
    eps = option_in(smoothing_static if smoothing is None else smoothing, dtype)
    if not (isinstance(eps, float) and eps == 0.0):
        t = jnp.where((eps >= 0) & (eps <= 1), (1 - eps) * t + eps / 2, jnp.nan)
    loss = _sigmoid_ce(x, t, 1.0 if pos_weight is None else pos_weight.astype(dtype))
    if weights is not None:
        loss = weights.astype(dtype) * loss
    return _finish(loss, valid, reduction, axes)


def binary_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    where: jax.Array | None = None,
    pos_weight: jax.Array | None = None,
    weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    reduction: str = "mean",
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> jax.Array:
    r"""Sigmoid binary cross-entropy from logits (PyTorch `BCEWithLogitsLoss`).

    .. math::

        t' = (1-\varepsilon) t + \varepsilon / 2, \qquad
        l = w \big[p\, t' \operatorname{softplus}(-x) + (1-t') \operatorname{softplus}(x)\big]

    which for p = 1 is max(x, 0) - x t' + log1p(exp(-|x|)).

    Args:
      logits: any shape, floating.
      targets: `logits.shape`, floating, usually in [0, 1].
      where: bool, broadcastable to `logits`; False drops an element.
      pos_weight: p, broadcastable to `logits` (e.g. (C,)): weight of positive targets.
      weights: w, broadcastable to `logits`: per-element rescaling (PyTorch's `weight`).
      label_smoothing: ε in [0, 1].
      reduction: "none", "sum" or "mean" over valid elements.
      vocab_axis_name / batch_axis_name: mesh axes the elements are split over; "sum"
        and "mean" then cover the whole mesh.

    Returns:
      float32 loss (float64 for float64 logits).
    """
    logits = _checks.check_floating("logits", logits)
    targets = _checks.check_floating("targets", targets)
    _checks.check_shape("targets", targets, logits.shape, "It must match `logits`.")
    if where is not None:
        where = _check_broadcastable("where", _checks.check_bool_mask("where", where), logits.shape)
    if pos_weight is not None:
        pos_weight = _check_broadcastable(
            "pos_weight", _checks.check_floating("pos_weight", pos_weight), logits.shape
        )
    if weights is not None:
        weights = _check_broadcastable(
            "weights", _checks.check_floating("weights", weights), logits.shape
        )
    smoothing_static, smoothing = _checks.check_scalar_option(
        "label_smoothing", label_smoothing, low=0.0, high=1.0
    )
    return _binary_cross_entropy(
        logits,
        targets,
        where,
        pos_weight,
        weights,
        smoothing,
        reduction=_checks.check_reduction(reduction),
        smoothing_static=smoothing_static,
        axes=_mesh_axes(**_checks.check_axis_names(vocab_axis_name, batch_axis_name)),
    )


def _log_max(dtype) -> float:
    """The largest power of e the dtype holds, less 1: where the derivatives below cap
    a factor that grows without bound, so that its product with 0 is 0, not NaN."""
    return float(np.log(np.finfo(dtype).max)) - 1


@jax.custom_jvp
def _log_one_minus_pt(x: jax.Array, t: jax.Array) -> jax.Array:
    """log(1 - p_t) where p_t = σ(x) t + (1 - σ(x))(1 - t).

    1 - p_t = t σ(-x) + (1 - t) σ(x), so in log space it is a logaddexp of
    log t - softplus(x) and log(1 - t) - softplus(-x): finite even when σ(x) rounds to
    0 or 1. Its derivatives are written out (`_log_one_minus_pt_jvp`): through the
    logaddexp, d/dt would meet the guard on log t at t = 0 (and log(1 - t) at t = 1)
    and come out 0 — which `_focal_factor_jvp` differentiates again for second
    derivatives.
    """

    def safe_log(a):
        return jnp.where(a > 0, jnp.log(jnp.where(a > 0, a, 1)), -jnp.inf)

    a, b = safe_log(t) - softplus(x), safe_log(1 - t) - softplus(-x)
    # Both terms are -inf when the prediction is certain and right (x = +inf, t = 1):
    # logaddexp's derivative there is NaN, so such elements get -inf and no derivative.
    certain = jnp.isneginf(a) & jnp.isneginf(b)
    lse = jnp.logaddexp(jnp.where(certain, 0, a), jnp.where(certain, 0, b))
    return jnp.where(certain, -jnp.inf, lse)


def _log_one_minus_pt_jvp(primals, tangents):
    """With L = log(1 - p_t), 1 - p_t = t σ(-x) + (1 - t) σ(x):

        ∂L/∂x = (1 - 2t) σ(x) σ(-x) / (1 - p_t) = (1 - 2t) exp(-softplus(x) - softplus(-x) - L)
        ∂L/∂t = (σ(-x) - σ(x)) / (1 - p_t) = (σ(-x) - σ(x)) exp(-L)

    (the first at most 1 in size for t in [0, 1], as 1 - p_t >= σ(x) σ(-x)); 0 where the
    prediction is certain (L = -inf), as through the guards of the value. Symbolic zero
    tangents skip their term; 1 / (1 - p_t) is capped at the dtype's largest power of
    e, so that a confident right prediction (|x| > 88 in float32) gives a large finite
    ∂L/∂t, whose product with a zero tangent (`jax.hessian` passes real zeros) or with
    the vanishing (1 - p_t)^(γ-1) of `_focal_factor_jvp` is 0, not NaN."""
    x, t = primals
    dx, dt = tangents
    out = _log_one_minus_pt(x, t)
    certain = jnp.isneginf(out)
    finite = jnp.where(certain, 0, out)
    tangent = jnp.zeros_like(out)
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        slope = (1 - 2 * t) * jnp.exp(-softplus(x) - softplus(-x) - finite)
        tangent += jnp.where(certain, 0, slope) * dx
    if not isinstance(dt, jax.custom_derivatives.SymbolicZero):
        slope = (jax.nn.sigmoid(-x) - jax.nn.sigmoid(x)) * jnp.exp(
            jnp.minimum(-finite, _log_max(out.dtype))
        )
        tangent += jnp.where(certain, 0, slope) * dt
    return out, tangent


_log_one_minus_pt.defjvp(_log_one_minus_pt_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _focal_factor(x: jax.Array, t: jax.Array, gamma: float) -> jax.Array:
    """(1 - p_t)^γ as exp(γ L), L = log(1 - p_t): finite for saturated logits."""
    return jnp.exp(gamma * _log_one_minus_pt(x, t))


def _focal_factor_jvp(gamma, primals, tangents):
    """The derivatives of (1 - p_t)^γ written out, because the chain rule through L
    meets 0·inf: at t = 0 or 1 (d log t / dt = inf times a weight of 0) and for certain
    predictions (L = -inf). With 1 - p_t = t σ(-x) + (1 - t) σ(x):

        ∂/∂x = γ (1 - 2t) σ(x) σ(-x) (1 - p_t)^(γ-1)
             = γ (1 - 2t) exp((γ-1) L - softplus(x) - softplus(-x))   (0 when L = -inf)
        ∂/∂t = γ (σ(-x) - σ(x)) (1 - p_t)^(γ-1)   (unbounded as L -> -inf for γ < 1)

    Tangents come as symbolic zeros when an input is not differentiated, so that the
    infinite ∂/∂t never meets a zero tangent of t (a gradient in x alone).
    """
    x, t = primals
    dx, dt = tangents
    log_gap = _log_one_minus_pt(x, t)
    out = jnp.exp(gamma * log_gap)
    certain = jnp.isneginf(log_gap)
    # (γ-1) L; L = -inf only with σ(x) σ(-x) = 0, where ∂/∂x is 0 and (γ-1)·-inf could be NaN.
    power = 0.0 if gamma == 1.0 else (gamma - 1) * jnp.where(certain, 0, log_gap)
    tangent = jnp.zeros_like(out)
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        slope = jnp.exp(power - softplus(x) - softplus(-x))
        tangent += gamma * (1 - 2 * t) * jnp.where(certain, 0, slope) * dx
    if not isinstance(dt, jax.custom_derivatives.SymbolicZero):
        # (1 - p_t)^(γ-1): 0 at L = -inf for γ > 1, 1 for γ = 1; for γ < 1 it grows without
        # bound as 1 - p_t -> 0 and is capped at the dtype's largest power of e, so that
        # its product with the vanishing BCE term (`_modulate`) is 0, not inf · 0 = NaN.
        # (There that product's exact value is γ/|x| of the t-gradient: under 1% once
        # the cap is reached, |x| > 88 in float32.)
        cap = _log_max(out.dtype)
        at_certain = -jnp.inf if gamma > 1 else 0.0 if gamma == 1 else cap
        gap_power = jnp.exp(jnp.minimum(jnp.where(certain, at_certain, power), cap))
        tangent += gamma * (jax.nn.sigmoid(-x) - jax.nn.sigmoid(x)) * gap_power * dt
    return out, tangent


_focal_factor.defjvp(_focal_factor_jvp, symbolic_zeros=True)


def _modulate(f: jax.Array, ce: jax.Array) -> jax.Array:
    """f·ce where an infinite ce (x = ±inf on the wrong side) sends no gradient into f.

    There f's derivative in x vanishes faster than ce grows, so the exact x-gradient is
    f·ce'; reverse mode would form f'·ce = 0·inf = NaN instead. (In t both terms are
    infinite with one sign: f·ce' alone has it.)
    """
    infinite = jnp.isinf(ce)
    finite = f * jnp.where(infinite, 0, ce)
    return jnp.where(infinite, _times(jax.lax.stop_gradient(f), ce), finite)


@functools.partial(jax.jit, static_argnames=("alpha", "gamma", "reduction", "axes"))
def _focal_loss(logits, targets, where, *, alpha, gamma, reduction, axes):
    logits, targets, where = elementwise_layout((logits, targets, where), logits.shape)
    x, t, valid = _inputs(logits, targets, where)
    ce = _sigmoid_ce(x, t)
    if gamma != 0.0:
        # (1 - p_t)^γ in log space: its derivative stays finite for γ in (0, 1) and for
        # saturated logits, where the power form gives 0 * inf.
        ce = _modulate(_focal_factor(x, t, gamma), ce)
    if alpha is not None:
        # α_t = α t + (1-α)(1-t), written with t once: with an infinite ce its t-derivative
        # is then (2α-1)·inf, not α·inf - (1-α)·inf = NaN.
        ce = ((1 - alpha) + (2 * alpha - 1) * t) * ce
    return _finish(ce, valid, reduction, axes)


def focal_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al. 2017; torchvision's `sigmoid_focal_loss`).

    .. math::

        p_t = \sigma(x) t + (1-\sigma(x))(1-t), \quad
        \alpha_t = \alpha t + (1-\alpha)(1-t), \quad
        l = \alpha_t (1-p_t)^\gamma \, \mathrm{BCE}(x, t)

    Args:
      logits, targets: same shape, floating.
      alpha: Python float in [0, 1] balancing positives; None or < 0 disables it.
      gamma: Python float >= 0, the focusing exponent (0 gives plain BCE).
      where: bool, broadcastable to `logits`; False drops an element.
      reduction: "none", "sum" or "mean" over valid elements.
      vocab_axis_name / batch_axis_name: as in `binary_cross_entropy`.
    """
    logits = _checks.check_floating("logits", logits)
    targets = _checks.check_floating("targets", targets)
    _checks.check_shape("targets", targets, logits.shape, "It must match `logits`.")
    if where is not None:
        where = _check_broadcastable("where", _checks.check_bool_mask("where", where), logits.shape)
    if alpha is not None:
        if not _checks.is_python_number(alpha):
            raise TypeError(f"`alpha` must be a Python float or None, got {type(alpha).__name__}.")
        alpha = float(alpha)
        if not alpha <= 1:  # NaN fails too
            raise ValueError(f"`alpha` must be <= 1 (or < 0 / None to disable it), got {alpha}.")
        alpha = None if alpha < 0 else alpha
    if not _checks.is_python_number(gamma):
        raise TypeError(f"`gamma` must be a Python float >= 0, got {type(gamma).__name__}.")
    if not (gamma >= 0 and gamma < float("inf")):
        raise ValueError(f"`gamma` must be >= 0 and finite, got {gamma}.")
    return _focal_loss(
        logits,
        targets,
        where,
        alpha=alpha,
        gamma=float(gamma),
        reduction=_checks.check_reduction(reduction),
        axes=_mesh_axes(**_checks.check_axis_names(vocab_axis_name, batch_axis_name)),
    )
