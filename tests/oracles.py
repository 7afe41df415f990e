"""Float64 NumPy oracles written from the formulas of SPEC.md, independent of jaxent.

Loops over positions are deliberate: each line mirrors the written definition, not the
vectorised code under test. Class axis last; callers move it.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _kept(x, logit_mask):
    keep = x != -np.inf
    return keep if logit_mask is None else keep & logit_mask


def _log_softmax_row(z, keep):
    """log p over the kept entries of one row; -inf elsewhere; None if nothing kept."""
    if not keep.any():
        return None, None
    m = z[keep].max()
    lse = m + np.log(np.exp(z[keep] - m).sum())
    lp = np.where(keep, z - lse, -np.inf)
    return lp, lse


def cross_entropy(
    logits,
    labels,
    *,
    where=None,
    ignore_index=None,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
):
    """SPEC §1. `where` is labels-shaped or logits-shaped (class axis last).

    Returns (loss, aux dict with lse, z_loss, accuracy, num_valid, weight_sum)."""
    x = _f64(logits)
    labels = np.asarray(labels)
    c_all = x.shape[-1]
    w = np.ones(c_all) if class_weights is None else _f64(class_weights)
    where = None if where is None else np.asarray(where, bool)
    logit_mask = where if where is not None and where.ndim == x.ndim else None
    pos_mask = where if where is not None and where.ndim == labels.ndim else None
    eps = float(label_smoothing)

    flat_x = x.reshape(-1, c_all)
    flat_y = labels.reshape(-1)
    flat_lm = (
        None if logit_mask is None else np.broadcast_to(logit_mask, x.shape).reshape(-1, c_all)
    )
    flat_pm = None if pos_mask is None else np.broadcast_to(pos_mask, labels.shape).reshape(-1)
    n = flat_y.shape[0]
    loss = np.zeros(n)
    zl_part = np.zeros(n)
    lse_out = np.full(n, -np.inf)
    valid = np.zeros(n, bool)
    weight = np.zeros(n)
    correct = np.zeros(n)
    for i in range(n):
        row = flat_x[i]
        keep = _kept(row, None if flat_lm is None else flat_lm[i])
        z = softcap * np.tanh(row / softcap) if softcap else row.copy()
        lp, lse = _log_softmax_row(z, keep)
        if lse is not None:
            lse_out[i] = lse
        y = int(flat_y[i])
        v = lse is not None
        if flat_pm is not None:
            v = v and bool(flat_pm[i])
        if ignore_index is not None and y == ignore_index:
            v = False
        if not v:
            continue
        valid[i] = True
        if not 0 <= y < c_all:
            loss[i] = np.nan
            continue
        count = keep.sum()
        label_term = (1 - eps) * w[y] * (-lp[y]) if (1 - eps) * w[y] != 0 else 0.0
        smooth = (eps / count) * np.sum(w[keep] * (-lp[keep])) if eps else 0.0
        zl = z_loss * w[y] * lse**2
        loss[i] = label_term + smooth + zl
        zl_part[i] = zl
        weight[i] = w[y]
        zm = np.where(keep, z, -np.inf)
        correct[i] = w[y] * (int(np.argmax(zm)) == y)
    shape = labels.shape
    ws = weight.sum()

    def red(a):
        if reduction == "none":
            return a.reshape(shape)
        if reduction == "sum":
            return a.sum()
        return a.sum() / ws if ws != 0 else 0.0

    aux = {
        "lse": lse_out.reshape(shape),
        "z_loss": red(zl_part),
        "accuracy": correct.sum() / ws if ws != 0 else 0.0,
        "num_valid": int(valid.sum()),
        "weight_sum": ws,
    }
    return red(loss), aux


def soft_cross_entropy(
    logits,
    targets,
    *,
    where=None,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
):
    """SPEC §2, class axis last."""
    x = _f64(logits)
    t_all = _f64(targets)
    c_all = x.shape[-1]
    w = np.ones(c_all) if class_weights is None else _f64(class_weights)
    where = None if where is None else np.asarray(where, bool)
    logit_mask = where if where is not None and where.ndim == x.ndim else None
    pos_mask = where if where is not None and where.ndim == x.ndim - 1 else None
    eps = float(label_smoothing)
    shape = x.shape[:-1]
    flat_x = x.reshape(-1, c_all)
    flat_t = t_all.reshape(-1, c_all)
    flat_lm = (
        None if logit_mask is None else np.broadcast_to(logit_mask, x.shape).reshape(-1, c_all)
    )
    flat_pm = None if pos_mask is None else np.broadcast_to(pos_mask, shape).reshape(-1)
    n = flat_x.shape[0]
    loss = np.zeros(n)
    valid = np.zeros(n)
    for i in range(n):
        keep = _kept(flat_x[i], None if flat_lm is None else flat_lm[i])
        z = softcap * np.tanh(flat_x[i] / softcap) if softcap else flat_x[i]
        lp, lse = _log_softmax_row(z, keep)
        if lse is None or (flat_pm is not None and not flat_pm[i]):
            continue
        valid[i] = 1
        t = (1 - eps) * flat_t[i] + np.where(keep, eps / keep.sum(), 0.0)
        wt = w * t
        terms = np.where(wt == 0, 0.0, wt * np.where(wt == 0, 0.0, lp))  # 0 * (-inf) is 0
        loss[i] = -terms.sum() + z_loss * lse**2
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum() if valid.sum() else 0.0


def _softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _reduce_elementwise(loss, valid, reduction):
    loss = np.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum() if valid.sum() else 0.0


def binary_cross_entropy(
    logits,
    targets,
    *,
    where=None,
    pos_weight=None,
    weights=None,
    label_smoothing=0.0,
    reduction="mean",
):
    """PyTorch BCEWithLogitsLoss: -w [p t log σ(x) + (1-t) log(1-σ(x))]."""
    x, t = _f64(logits), _f64(targets)
    t = (1 - label_smoothing) * t + label_smoothing / 2
    p = 1.0 if pos_weight is None else _f64(pos_weight)
    log_sig = -_softplus(-x)
    log_one_minus = -_softplus(x)
    loss = -(p * t * log_sig + (1 - t) * log_one_minus)
    if weights is not None:
        loss = _f64(weights) * loss
    valid = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    return _reduce_elementwise(loss, valid, reduction)


def focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, where=None, reduction="mean"):
    """torchvision sigmoid_focal_loss, with `reduction` over valid elements."""
    x, t = _f64(logits), _f64(targets)
    p = 1 / (1 + np.exp(-x))
    ce = _softplus(x) - x * t
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    valid = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    return _reduce_elementwise(loss, valid, reduction)


def kl_divergence(logits, target_logits, *, temperature=1.0, where=None, reduction="mean"):
    """T² · Σ p (log p - log q), p = softmax(t/T), q = softmax(x/T); class axis last."""
    xs = _f64(logits) / temperature
    xt = _f64(target_logits) / temperature
    shape = xs.shape[:-1]
    c_all = xs.shape[-1]
    pos = None if where is None else np.broadcast_to(np.asarray(where, bool), shape).reshape(-1)
    fs, ft = xs.reshape(-1, c_all), xt.reshape(-1, c_all)
    loss = np.zeros(fs.shape[0])
    valid = np.zeros(fs.shape[0])
    for i in range(fs.shape[0]):
        lq, _ = _log_softmax_row(fs[i], fs[i] != -np.inf)
        lp, _ = _log_softmax_row(ft[i], ft[i] != -np.inf)
        if lp is None or (pos is not None and not pos[i]):
            continue
        valid[i] = 1
        keep = ft[i] != -np.inf
        loss[i] = temperature**2 * np.sum(np.exp(lp[keep]) * (lp[keep] - lq[keep]))
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum() if valid.sum() else 0.0


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (absolute error when want is all zero)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    denom = np.linalg.norm(want)
    diff = np.linalg.norm(got - want)
    return float(diff / denom) if denom else float(diff)


def option_gradient(loss, smoothing, z_loss, h=1e-5):
    """(d/dε, d/dλ) of a float64 oracle `loss(ε, λ)` by central differences."""
    return (
        (loss(smoothing + h, z_loss) - loss(smoothing - h, z_loss)) / (2 * h),
        (loss(smoothing, z_loss + h) - loss(smoothing, z_loss - h)) / (2 * h),
    )
