"""Pure-JAX fused `linear_cross_entropy` over blocks of tokens.

The N tokens are cut into blocks of B (padded; padding is a dropped position), and
each block into `sub_blocks` strided sub-blocks of S = B / sub_blocks tokens. For each
sub-block the (S, V) float32 logits are formed with one matmul, turned into
per-position losses by `_stable.categorical_rows` (the same code as `cross_entropy`,
with the row statistics `cross_entropy` takes on the backend: `Static.row_kernel`, on
a GPU the one-read Triton kernel), and discarded, so memory holds one sub-block of
float32 logits, never (N, V).

Why two sizes: the dw matmul of a block, dw += dlogits.T @ x_block, contracts over
its B tokens and reads and writes the (V, D) float32 accumulator once per block. With
few tokens per block that traffic rivals the matmul itself (at Gemma-2's head, V x D
float32 is 2.4 GB, moved twice per block), so blocks want to be long (B ~ 2048); the
float32 logits, 4 bytes per logit against the gradient's 2 in bfloat16, are what
bounds memory, so they are formed a sub-block at a time and only the block's
gradient, in the matmul dtype, is held whole.

Two gradient schemes, both `jax.custom_vjp`:

- `token_sum` (reductions "sum"/"mean": the cotangent of every position is the same
  scalar). The forward pass also forms each block's logit gradient and consumes it
  at once: dx_block = dlogits @ w, dw += dlogits.T @ x_block (float32 accumulator).
  Three matmuls in all and no recompute; the backward only scales the saved dx, dw
  (and the gradients of traced scalar options).
- `token_rows` (reduction "none": arbitrary per-position cotangents). The forward
  keeps nothing but its inputs; the backward recomputes each sub-block's logits (a
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
from ..pallas import stats_for
from .blocks import put_block, strided_blocks, take_block
from .mesh import sum_to_primal_axes, varying_like
from .reference import gradient_dtype, logits_dtype, project


class Static(NamedTuple):
    """Hashable, trace-time options of one call."""

    softcap: float | None
    ignore_index: int | None
    label_smoothing: float | None  # None: the value is the array argument `ls`
    z_loss: float | None
    vocab_axis_name: object
    with_argmax: bool  # only for aux.accuracy
    sub_blocks: int = 1  # "chunked": strided sub-blocks per block of tokens
    # The row statistics of each block of logits ("chunked": of tokens, "lean": of
    # classes), as the plain losses choose them (`jaxent.pallas.stats_for`: on a GPU
    # the one-read kernel, on a TPU XLA's one-read reduction, on a CPU two reads).
    row_kernel: object = None  # `jaxent.pallas.choose`'s Kernel; None: two reads (XLA)
    partitioned: bool = False  # `_sharding.xla_partitions` of the call
    fused: object = None  # "pallas": lean's scheme, these fused-head kernels' Config
    group: int = 1  # "lean": runs of classes kept together in its blocks (`blocks`)
    padded: bool = True  # "lean": the blocks hold padding classes (V % block != 0)


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


def _rows(st: Static, ops: Operands, logits, labels, position_mask, logit_mask,
          forward=False) -> Rows:  # fmt: skip
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
        stats=stats_for(st.row_kernel, partitioned=st.partitioned, forward=forward),
    )


def _block(ops: Operands, i):
    """Block i of the positions: x (B, D), labels, position_mask (B,), logit_mask (B, V).

    Indexing axis 1 of the (B, nb, ...) views reads the block where it lies: the
    blocks are never stacked into a transposed copy of x.
    """
    return tuple(take_block(a, i) for a in (ops.x, ops.labels, ops.position_mask, ops.logit_mask))


def _indices(n: int):
    return jnp.arange(n, dtype=jnp.int32)


def _split(st: Static, a):
    """A block's (B, ...) array as `sub_blocks` strided sub-blocks, (S, sub_blocks, ...):
    sub-block j holds the block's positions j, j + sub_blocks, ... — strided for the
    reason the blocks are (see `blocks`), so a split of the positions over devices
    stays a split of every sub-block."""
    return None if a is None else strided_blocks(a, st.sub_blocks, a.shape[0] // st.sub_blocks)


def _in_block_order(a):
    """Per-sub-block results stacked by a loop, (sub_blocks, S, ...), in the order of
    the block's positions, (B, ...)."""
    return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _block_rows(st: Static, ops: Operands, block) -> Rows:
    """Per-position rows of one block, (B,) each, a sub-block of logits at a time."""
    subs = tuple(_split(st, a) for a in block)

    def step(carry, j):
        xs, labels, pmask, lmask = (take_block(a, j) for a in subs)
        # The forward pass is never differentiated in reverse mode (the custom_vjps
        # below have their own backward), only in forward mode for second derivatives.
        logits = project(xs, ops.w, ops.bias)
        return carry, _rows(st, ops, logits, labels, pmask, lmask, forward=True)

    rows = lax.scan(step, None, _indices(st.sub_blocks))[1]
    return jax.tree.map(_in_block_order, rows)


def _forward(st: Static, ops: Operands) -> Rows:
    """Per-position rows, (nb, B) each."""

    def step(carry, i):
        return carry, _block_rows(st, ops, _block(ops, i))

    return lax.scan(step, None, _indices(ops.x.shape[1]))[1]


def _block_grads(st: Static, ops: Operands, block, dlogits, cotangent=None):
    """The logit gradient of one block, formed a sub-block at a time into `dlogits`
    (the previous block's buffer, (sub_blocks, S, V) in the matmul dtype, written over
    in place: a buffer made per block would be filled with zeros first, a pass over
    it): of Σ_n l_n for `token_sum` (cotangent None; the rows come back too), else of
    Σ_n g_n l_n with the block's (B,) cotangents g.

    Returns (rows in block order or None, dlogits, x (sub_blocks, S, D), the bias
    gradient (V,) float32 or None, and the gradients of the traced scalar options (ls,
    zl), each None when static): dlogits and x keep their rows in sub-block order — the
    matmuls only need them to agree, and merging the axes would interleave a split of
    S over devices (an all-gather).
    """
    subs = tuple(_split(st, a) for a in block)
    cts = _split(st, cotangent)
    acc = logits_dtype(ops.x, ops.w)
    options = _local_options(st, ops)

    def step(buffer, j):
        xs, labels, pmask, lmask = (take_block(a, j) for a in subs)
        logits = project(xs, ops.w, ops.bias)

        def rows_of(lg, ls, zl):  # the traced options (or None) differentiated too
            return _rows(st, ops._replace(ls=ls, zl=zl), lg, labels, pmask, lmask)

        def total(lg, ls, zl):
            rows = rows_of(lg, ls, zl)
            return jnp.sum(rows.loss), rows

        if cts is None:
            grad = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)
            (_, rows), (dlogits, *d_options) = grad(logits, *options)
        else:
            rows, vjp = None, jax.vjp(lambda *a: rows_of(*a).loss, logits, *options)[1]
            dlogits, *d_options = vjp(take_block(cts, j).astype(logits.dtype))
        db = None if ops.bias is None else jnp.sum(dlogits, axis=0, dtype=acc)
        buffer = lax.dynamic_update_index_in_dim(buffer, dlogits.astype(buffer.dtype), j, 0)
        return buffer, (rows, db, tuple(d_options))

    dlogits, (rows, db, d_options) = lax.scan(step, dlogits, _indices(st.sub_blocks))
    rows = None if rows is None else jax.tree.map(_in_block_order, rows)
    x = jnp.swapaxes(subs[0], 0, 1)  # (sub_blocks, S, D): the rows of dlogits
    db = None if db is None else jnp.sum(db, axis=0)
    return rows, dlogits, x, db, jax.tree.map(lambda d: jnp.sum(d, axis=0), d_options)


def _local_options(st: Static, ops: Operands):
    """The traced scalar options (ls, zl; None when static) in the accumulation dtype,
    made to vary like the positions: differentiated so, they get this device's share of
    their gradient (`_param_cotangents` sums the shares), where the replicated scalars
    would get the whole mesh's sum from every device. (Not over the vocabulary axis:
    every vocabulary shard computes the same rows.)"""
    refs = jax.tree.leaves(ops)
    acc = logits_dtype(ops.x, ops.w)
    return tuple(
        None if v is None else varying_like(v.astype(acc), refs, st.vocab_axis_name)
        for v in (ops.ls, ops.zl)
    )


def _logit_grad_to_params(st: Static, ops: Operands, x, dlogits, db_block, acc):
    """dx = dlogits @ w for the block's rows (..., D in the order of x's, in x's dtype),
    and the block's dw, db contributions added to `acc` (dw, db).

    The matmuls are fed in the inputs' dtype and accumulate in float32. With a split
    vocabulary each shard holds a partial dx: sum it.
    """
    dw, db = acc
    dx = jnp.dot(dlogits, ops.w, preferred_element_type=dw.dtype)
    if st.vocab_axis_name is not None:
        dx = lax.psum(dx, st.vocab_axis_name)
    rows = tuple(range(x.ndim - 1))  # every axis but the last: the tokens
    dw = dw + lax.dot_general(dlogits, x, ((rows, rows), ((), ())), preferred_element_type=dw.dtype)
    db = None if db is None else db + db_block
    return dx.astype(ops.x.dtype), (dw, db)


def _block_step(st: Static, ops: Operands, carry, i, cotangent=None):
    """One block of either backward: its gradients, dx written into its place."""
    (dw, db_acc, options_acc), dx, dlogits = carry
    rows, dlogits, x, db, d_options = _block_grads(st, ops, _block(ops, i), dlogits, cotangent)
    dxb, (dw, db_acc) = _logit_grad_to_params(st, ops, x, dlogits, db, (dw, db_acc))
    options_acc = jax.tree.map(jnp.add, options_acc, d_options)
    return ((dw, db_acc, options_acc), put_block(dx, _in_block_order(dxb), i), dlogits), rows


def _zero_acc(st: Static, ops: Operands):
    """Float32 (float64 for a float64 x or w) accumulators for dw, dbias and the traced
    scalar options (ls, zl; None when static), the (B, nb, D) dx buffer in x's dtype
    that each block's dx is written into (summed over the vocabulary shards before, so
    it does not vary over that axis), and the buffer each block's logit gradient is
    formed in, (sub_blocks, S, V) in the matmul dtype."""
    acc = logits_dtype(ops.x, ops.w)
    refs = jax.tree.leaves(ops)
    db = None if ops.bias is None else varying_like(jnp.zeros(ops.bias.shape, acc), refs)
    dx = varying_like(jnp.zeros(ops.x.shape, ops.x.dtype), refs, st.vocab_axis_name)
    options = jax.tree.map(jnp.zeros_like, _local_options(st, ops))
    block = ops.x.shape[0]  # B positions per block (x is (B, nb, D))
    shape = (st.sub_blocks, block // st.sub_blocks, ops.w.shape[0])
    mm = gradient_dtype(jnp.result_type(ops.x.dtype, ops.w.dtype))
    dlogits = varying_like(jnp.zeros(shape, mm), refs)
    return (varying_like(jnp.zeros(ops.w.shape, acc), refs), db, options), dx, dlogits


def _param_cotangents(ops: Operands, dx, acc, scale=1.0):
    """Cotangents for every field of `Operands` (None for the non-differentiable ones)."""
    dw, db, (dls, dzl) = acc
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
        ls=None if dls is None else sum_to_primal_axes(dls * scale, ops.ls).astype(ops.ls.dtype),
        zl=None if dzl is None else sum_to_primal_axes(dzl * scale, ops.zl).astype(ops.zl.dtype),
    )


# --- reduction "sum" / "mean": gradient formed in the forward pass -------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_sum(st: Static, ops: Operands) -> tuple[jax.Array, Rows]:
    """(Σ_n l_n, per-position rows). The rows carry no gradient."""
    rows = _forward(st, ops)
    return jnp.sum(rows.loss), rows


def _token_sum_fwd(st: Static, ops: Operands):
    def step(carry, i):
        return _block_step(st, ops, carry, i)

    (acc, dx, _), rows = lax.scan(step, _zero_acc(st, ops), _indices(ops.x.shape[1]))
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
        i, g = block
        return _block_step(st, ops, carry, i, g)[0], None

    blocks = (_indices(ops.x.shape[1]), cotangents.loss)
    (acc, dx, _), _ = lax.scan(step, _zero_acc(st, ops), blocks)
    return (_param_cotangents(ops, dx, acc),)


token_rows.defvjp(_token_rows_fwd, _token_rows_bwd)
