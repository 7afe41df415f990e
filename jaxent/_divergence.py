"""`kl_divergence`: knowledge-distillation loss between two sets of logits."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from . import _checks
from ._categorical import masks_class_last, split_where
from ._reduce import reduce_loss
from ._sharding import LOGITS, WHERE, manual_if_explicit
from ._stable import compute_dtype, kept, prepare_logits, safe_shift, shard_max, vocab_psum


@functools.partial(
    jax.jit,
    static_argnames=(
        "axis",
        "where_kind",
        "temperature",
        "reduction",
        "vocab_axis_name",
        "batch_axis_name",
    ),
)
@manual_if_explicit(LOGITS, LOGITS, WHERE)  # explicitly sharded inputs: shard_map
def _kl_divergence(
    logits,
    target_logits,
    where,
    *,
    axis,
    where_kind,
    temperature,
    reduction,
    vocab_axis_name,
    batch_axis_name,
):
    logit_mask, position_mask = masks_class_last(where, where_kind, logits.shape, axis)
    dtype = compute_dtype(jnp.result_type(logits.dtype, target_logits.dtype))
    rows = functools.partial(
        _rows, axis=axis, dtype=dtype, temperature=temperature, vocab_axis_name=vocab_axis_name
    )
    # Reverse mode saves only the per-row statistics (and the inputs, which the caller
    # holds anyway) and recomputes the elementwise terms. Without this, autodiff saves
    # the branches' intermediates: measured on CPU at (1024, 8192) float32, compiled
    # temp 136 MiB instead of 104 (the old direct sum's too) and 25% slower.
    rows = jax.checkpoint(rows, policy=jax.checkpoint_policies.save_only_these_names(_SAVED))
    kl, valid = rows(logits, target_logits, logit_mask, position_mask)
    return reduce_loss(kl, valid.astype(dtype), reduction, batch_axis_name)


_SAVED = "jaxent_kl_row_stats"


def _rows(logits, target_logits, logit_mask, position_mask, *, axis, dtype, temperature,
          vocab_axis_name):  # fmt: skip
    """(T² KL per position, valid), 0 at dropped positions."""

    def shifted(a):
        a = jnp.moveaxis(a, axis, -1).astype(dtype)
        if position_mask is not None:
            # Dropped positions (padding) may hold NaN or inf: zeroed here, their loss is
            # 0 with exactly zero gradient (masking only the result would give 0 * NaN).
            a = jnp.where(position_mask[..., None], a, 0)
        x = prepare_logits(a, logit_mask, None)
        return x, *_shifted_exp(x, temperature, vocab_axis_name)

    (xs, rs, es, ss, _), (xt, rt, et, st, any_t) = shifted(logits), shifted(target_logits)
    keep_s, keep_t = kept(xs), kept(xt)
    valid = any_t if position_mask is None else any_t & position_mask
    st = jnp.where(valid, st, 1)[..., None]
    ss = jnp.where(valid & (ss != 0), ss, 1)[..., None]
    p, q = et / st, es / ss
    # u = log p - log q = (rt - rs) - log(st / ss). rt, rs are the scaled logits less
    # their row max, so u is accurate relative to the spread of the logits, not to
    # their size or offset (it is small where the divergence is, at high T). The
    # rounding of log(st / ss) shifts the whole row, to which the sum below is
    # insensitive to first order (the derivative is -KL: an absolute error of the shift
    # is a relative error of KL). Dropped logits enter as 0, not -inf: the unselected
    # branch of a `where` still gets a zero cotangent, and 0 * inf would make it NaN.
    both = keep_t & keep_s
    u = jnp.where(both, rt - rs, 0) - jnp.log(st / ss)
    # KL = Σ_{teacher} q φ(u) + Σ_{student only} q, φ(u) = u e^u - e^u + 1 >= 0: every
    # term is non-negative, so nothing cancels however small the divergence.
    terms = jnp.where(both, _q_phi(u, p, q), jnp.where(keep_s, q, 0))
    kl = vocab_psum(jnp.sum(terms, axis=-1), vocab_axis_name)
    # Teacher mass on a logit the student cannot produce: the divergence is infinite.
    unreachable = vocab_psum(jnp.sum(keep_t & ~keep_s, axis=-1), vocab_axis_name) > 0
    kl = jnp.where(unreachable, jnp.inf, kl) * temperature**2
    return jnp.where(valid, kl, 0), valid


def _shifted_exp(x, temperature, vocab_axis_name):
    """(r, e, s, any_kept) of prepared logits x (dropped: -inf), class axis last:
    r = (x - m) / T <= 0 with m the row max of x (gradient-free, across vocab shards;
    0 for a row with nothing kept), e = exp(r), s = Σ e, any_kept: whether the row
    keeps a logit (True for NaN rows, so NaN propagates). Shifting before scaling
    keeps the rounding of r relative to x - m, not to x. r is clamped to finite
    values (dropped logits too: they are told apart by x), so differences of r never
    meet inf - inf; a +inf logit makes its row NaN, as elsewhere in jaxent."""
    best = lax.stop_gradient(shard_max(jnp.max(x, axis=-1), None, vocab_axis_name)[0])
    best = checkpoint_name(best, _SAVED)
    r = jnp.maximum((x - safe_shift(best)[..., None]) / temperature, jnp.finfo(x.dtype).min)
    e = jnp.exp(r)
    s = checkpoint_name(vocab_psum(jnp.sum(e, axis=-1), vocab_axis_name), _SAVED)
    return r, e, s, ~jnp.isneginf(best)


def _phi_coefficients(dtype) -> tuple[float, ...]:
    """(k - 1) / k! for k = 2..K: φ(u) = Σ_k (k - 1) u^k / k!, truncated where the next
    term is below the dtype's rounding for |u| < 1/2."""
    last = 17 if dtype == jnp.float64 else 9
    return tuple((k - 1) / math.factorial(k) for k in range(2, last + 1))


def _q_phi(u, p, q):
    """q φ(u), φ(u) = u e^u - e^u + 1, for u = log(p / q), without cancellation:
    the series for |u| < 1/2; q (1 - e^u (1 - u)) below, where e^u < 1; p (u - 1) + q
    above (q e^u = p, and e^u may overflow). Each branch's input is clamped where it is
    not selected, so its (discarded) gradient stays finite."""
    small = jnp.abs(u) < 0.5
    us = jnp.where(small, u, 0)
    series = functools.reduce(lambda acc, c: acc * us + c, _phi_coefficients(u.dtype)[::-1])
    un = jnp.minimum(u, 0)
    below = q * (1 - jnp.exp(un) * (1 - un))
    above = p * (u - 1) + q
    return jnp.where(small, q * (us * us) * series, jnp.where(u < 0, below, above))


def kl_divergence(
    logits: jax.Array,
    target_logits: jax.Array,
    *,
    axis: int = -1,
    temperature: float = 1.0,
    where: jax.Array | None = None,
    reduction: str = "mean",
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> jax.Array:
    r"""KL(softmax(target_logits / T) ‖ softmax(logits / T)) · T² per position.

    .. math::

        l_n = T^2 \textstyle\sum_c p_{n,c} (\log p_{n,c} - \log q_{n,c}),\quad
        p = \mathrm{softmax}(t / T),\ q = \mathrm{softmax}(x / T)

    (Hinton et al. 2015: the T² keeps gradient magnitudes comparable across T.)

    Precision: the divergence shrinks like 1/T² while log p and log q do not, so it is
    summed as Σ_c q_c φ(u_c) + Σ_(c: p_c = 0) q_c with u = log(p/q) and
    φ(u) = u e^u - e^u + 1 ≥ 0: non-negative terms, nothing cancels. u is formed from
    the logits less their row max, so its rounding follows the spread of the logits,
    not their offset. Measured in float32 against a float64 oracle (16×256 logits,
    independent, close with offsets of 1000, or a sharply peaked teacher): relative
    error ≤ 2e-7 for the loss and ≤ 2e-6 for both gradients at T = 1, 20, 100 and
    1000 alike (summing p (log p - log q) directly gave 3e-5 at T=20 and 6e-2 at
    T=1000 per position, worse with offset logits). Reverse mode keeps only the inputs
    and per-position statistics and recomputes the elementwise terms.

    Args:
      logits: the student's logits, class axis `axis`.
      target_logits: the teacher's logits, same shape. Gradients flow to both; wrap a
        frozen teacher in `lax.stop_gradient`.
      temperature: T > 0 (Python float).
      where: bool, positions-shaped (drops positions) or logits-shaped (drops classes
        from both distributions).
      reduction: "none", "sum" or "mean" over valid positions (for (N, C) inputs
        PyTorch's "batchmean", the mathematically correct mean; PyTorch's own "mean"
        also divides by C).
      vocab_axis_name / batch_axis_name: as in `cross_entropy`.

    A `-inf` target logit (zero target probability) contributes exactly 0; a target
    class with probability > 0 where the student has a `-inf` logit gives +inf.
    """
    logits = _checks.check_floating("logits", logits)
    target_logits = _checks.check_floating("target_logits", target_logits)
    axis = _checks.check_axis(axis, logits.ndim)
    _checks.check_num_classes("logits", logits.shape[axis], f"shape {logits.shape}, axis {axis}")
    _checks.check_shape("target_logits", target_logits, logits.shape, "It must match `logits`.")
    temperature = _checks.check_positive_or_none("temperature", temperature, none_ok=False)
    positions = logits.shape[:axis] + logits.shape[axis + 1 :]
    return _kl_divergence(
        logits,
        target_logits,
        None if where is None else jnp.asarray(where),
        axis=axis,
        where_kind=split_where(where, logits.shape, positions, axis),
        temperature=temperature,
        reduction=_checks.check_reduction(reduction),
        **_checks.check_axis_names(vocab_axis_name, batch_axis_name),
    )
