"""Pure-JAX fused `linear_cross_entropy` over blocks of tokens.

The N tokens are cut into blocks of B (padded; padding is a dropped position). For
each block the (B, V) logits are formed with one matmul, turned into per-position
losses by `_stable.categorical_rows` (the same code as `cross_entropy`), and
discarded, so memory holds one block of logits, never (N, V).

Two gradient schemes, both `jax.custom_vjp`:

- `token_sum` (reductions "sum"/"mean": the cotangent of every position is the same
  scalar). The forward pass also forms each block's logit gradient and consumes it
  at once: dx_block = dlogits @ w, dw += dlogits.T @ x_block (float32 accumulator).
  Three matmuls in all and no recompute; the backward only scales the saved dx, dw.
- `token_rows` (reduction "none": arbitrary per-position cotangents). The forward
  keeps nothing but its inputs; the backward recomputes each block's logits (a
  fourth matmul) and applies the cotangent.

A call without differentiation runs only the forward scan (no gradient work).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._stable import Rows, categorical_rows
from .blocks import put_block, take_block
from .mesh import sum_to_primal_axes, varying_like
from .reference import project


class Static(NamedTuple):
    """Hashable, trace-time options of one call."""

    softcap: float | None
    ignore_index: int | None
    label_smoothing: float | None  # None: the value is the array argument `ls`
    z_loss: float | None
    vocab_axis_name: object
    with_argmax: bool  # only for aux.accuracy


class Operands(NamedTuple):
    """Arrays of one call, positions cut into nb strided blocks of B (block i is index i
    of axis 1: rows i, i + nb, ...): x (B, nb, D), labels and position_mask (B, nb),
    logit_mask (B, nb, V) or None; w (V, D); bias, class_weights (V,) or None; ls,
    z_loss scalar arrays or None (then static)."""

    x: jax.Array
    w: jax.Array
    bias: jax.Array | None
    labels: jax.Array
    position_mask: jax.Array
    logit_mask: jax.Array | None
    class_weights: jax.Array | None
    ls: jax.Array | None
    zl: jax.Array | None


def pick(static_value, array_value):
    return static_value if array_value is None else array_value


def _rows(st: Static, ops: Operands, logits, labels, position_mask, logit_mask) -> Rows:
    return categorical_rows(
        logits,
        labels,
        logit_mask=logit_mask,
        position_mask=position_mask,
        ignore_index=st.ignore_index,
        class_weights=ops.class_weights,
        label_smoothing=pick(st.label_smoothing, ops.ls),
        z_loss=pick(st.z_loss, ops.zl),
        softcap=st.softcap,
        vocab_axis_name=st.vocab_axis_name,
        with_argmax=st.with_argmax,
    )


def _block(ops: Operands, i):
    """Block i of the positions: x (B, D), labels, position_mask (B,), logit_mask (B, V).

    Indexing axis 1 of the (B, nb, ...) views reads the block where it lies: the
    blocks are never stacked into a transposed copy of x.
    """
    return tuple(take_block(a, i) for a in (ops.x, ops.labels, ops.position_mask, ops.logit_mask))


def _indices(ops: Operands):
    return jnp.arange(ops.x.shape[1], dtype=jnp.int32)


def _forward(st: Static, ops: Operands) -> Rows:
    """Per-position rows, (nb, B) each."""

    def step(carry, i):
        xb, labels, pmask, lmask = _block(ops, i)
        return carry, _rows(st, ops, project(xb, ops.w, ops.bias), labels, pmask, lmask)

    return lax.scan(step, None, _indices(ops))[1]


def _logit_grad_to_params(st: Static, ops: Operands, xb, dlogits, acc):
    """dx_block = dlogits @ w and the block's dw, db contributions added to `acc`.

    The matmuls are fed in the inputs' dtype and accumulate in float32; dx leaves in
    x's dtype. With a split vocabulary each shard holds a partial dx: sum it.
    """
    dw, db = acc
    dl = dlogits.astype(jnp.result_type(ops.x.dtype, ops.w.dtype))
    dx = jnp.dot(dl, ops.w, preferred_element_type=dw.dtype)
    if st.vocab_axis_name is not None:
        dx = lax.psum(dx, st.vocab_axis_name)
    dw = dw + lax.dot_general(dl, xb, (((0,), (0,)), ((), ())), preferred_element_type=dw.dtype)
    db = None if db is None else db + jnp.sum(dlogits, axis=0, dtype=db.dtype)
    return dx.astype(ops.x.dtype), (dw, db)


def _zero_acc(st: Static, ops: Operands):
    """Float32 (float64 for float64 w) accumulators for dw and dbias, and the (B, nb, D)
    dx buffer in x's dtype that each block's dx is written into (summed over the
    vocabulary shards before, so it does not vary over that axis)."""
    acc = jnp.float64 if ops.w.dtype == jnp.float64 else jnp.float32
    refs = jax.tree.leaves(ops)
    db = None if ops.bias is None else varying_like(jnp.zeros(ops.bias.shape, acc), refs)
    dx = varying_like(jnp.zeros(ops.x.shape, ops.x.dtype), refs, st.vocab_axis_name)
    return (varying_like(jnp.zeros(ops.w.shape, acc), refs), db), dx


def _param_cotangents(ops: Operands, dx, acc, scale=1.0):
    """Cotangents for every field of `Operands` (None for the non-differentiable ones)."""
    dw, db = acc
    return Operands(
        x=sum_to_primal_axes(dx * scale, ops.x).astype(ops.x.dtype),
        w=sum_to_primal_axes(dw * scale, ops.w).astype(ops.w.dtype),
        bias=None
        if db is None
        else sum_to_primal_axes(db * scale, ops.bias).astype(ops.bias.dtype),
        labels=None,
        position_mask=None,
        logit_mask=None,
        class_weights=None,
        ls=None,
        zl=None,
    )


# --- reduction "sum" / "mean": gradient formed in the forward pass -------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_sum(st: Static, ops: Operands) -> tuple[jax.Array, Rows]:
    """(Σ_n l_n, per-position rows). The rows carry no gradient."""
    rows = _forward(st, ops)
    return jnp.sum(rows.loss), rows


def _token_sum_fwd(st: Static, ops: Operands):
    def step(carry, i):
        acc, dx = carry
        xb, labels, pmask, lmask = _block(ops, i)
        logits = project(xb, ops.w, ops.bias)

        def block_total(lg):
            rows = _rows(st, ops, lg, labels, pmask, lmask)
            return jnp.sum(rows.loss), rows

        (_, rows), dlogits = jax.value_and_grad(block_total, has_aux=True)(logits)
        dxb, acc = _logit_grad_to_params(st, ops, xb, dlogits, acc)
        return (acc, put_block(dx, dxb, i)), rows

    (acc, dx), rows = lax.scan(step, _zero_acc(st, ops), _indices(ops))
    return (jnp.sum(rows.loss), rows), (ops, dx, acc)


def _token_sum_bwd(st: Static, residuals, cotangents):
    ops, dx, acc = residuals
    g_total, _ = cotangents  # rows are auxiliary outputs: their cotangents are ignored
    return (_param_cotangents(ops, dx, acc, g_total),)


token_sum.defvjp(_token_sum_fwd, _token_sum_bwd)


# --- reduction "none": recompute in the backward pass --------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_rows(st: Static, ops: Operands) -> Rows:
    """Per-position rows; only `loss` carries a gradient."""
    return _forward(st, ops)


def _token_rows_fwd(st: Static, ops: Operands):
    return _forward(st, ops), ops


def _token_rows_bwd(st: Static, ops: Operands, cotangents: Rows):
    def step(carry, block):
        acc, dx = carry
        i, g = block
        xb, labels, pmask, lmask = _block(ops, i)
        logits = project(xb, ops.w, ops.bias)
        _, vjp = jax.vjp(lambda lg: _rows(st, ops, lg, labels, pmask, lmask).loss, logits)
        (dlogits,) = vjp(g.astype(logits.dtype))
        dxb, acc = _logit_grad_to_params(st, ops, xb, dlogits, acc)
        return (acc, put_block(dx, dxb, i)), None

    (acc, dx), _ = lax.scan(step, _zero_acc(st, ops), (_indices(ops), cotangents.loss))
    return (_param_cotangents(ops, dx, acc),)


token_rows.defvjp(_token_rows_fwd, _token_rows_bwd)
