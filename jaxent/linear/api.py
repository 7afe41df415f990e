"""`linear_cross_entropy`: argument checks, implementation choice, dispatch."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import _checks, pallas
from .._categorical import aux_from_rows, finish, split_where
from .._reduce import global_sum, stacked_sums, weighted_mean
from .._sharding import (
    CLASSES,
    HIDDEN,
    POSITIONS,
    TABLE,
    WHERE,
    manual_if_explicit,
    xla_partitions,
)
from .._stable import kept_positions
from ..pallas import fused_head
from . import chunked, lean, mesh
from .blocks import strided_blocks, unblock
from .reference import linear_cross_entropy_xla, logits_dtype

IMPLEMENTATIONS = (None, "xla", "chunked", "lean", "pallas")

# "chunked" memory budgets by backend, in bytes: (one block's logit gradient, B x V in
# the matmul dtype; one sub-block's float32 logits, S x V). Small on CPU, where the
# matmuls are efficient at any size and memory is what a block costs; large on
# accelerators, where long blocks keep the dw matmul from being bound by its (V, D)
# float32 accumulator, read and written once per block.
_BLOCK_BYTES = {
    "cpu": (16 << 20, 16 << 20),
    "gpu": (1 << 30, 512 << 20),
    "tpu": (256 << 20, 128 << 20),
}


def _budget(backend: str | None) -> tuple[int, int]:
    return _BLOCK_BYTES.get(backend or jax.default_backend(), _BLOCK_BYTES["gpu"])


def default_block_size(
    num_tokens: int, vocab: int, backend: str | None = None, itemsize: int = 4
) -> int:
    """Tokens per block of "chunked": the largest power of two in [8, 2048] whose logit
    gradient (B x V, `itemsize` bytes each: the matmul dtype's) fits the backend's
    budget, no larger than needed for `num_tokens`."""
    budget = _budget(backend)[0]
    block = 8
    while block < 2048 and 2 * block * vocab * itemsize <= budget:
        block *= 2
    while block > 8 and block // 2 >= num_tokens:
        block //= 2
    return block


def default_sub_block(block: int, vocab: int, backend: str | None = None, itemsize: int = 4) -> int:
    """Tokens per sub-block of "chunked": the largest power of two dividing `block` whose
    float32 logits (S x V) fit the backend's budget (at least 1). With a 4-byte matmul
    dtype the whole block: its gradient then overwrites its logits in place, so
    sub-blocks would only add a buffer (measured on CPU)."""
    if itemsize >= 4:
        return block
    budget = _budget(backend)[1]
    sub = block & -block  # the largest power of two dividing the block
    while sub > 1 and sub * vocab * 4 > budget:
        sub //= 2
    return sub


# Bytes of one (N, Bv) block of float32 logits for "lean", by backend: with its
# gradient and the (N, D) float32 dx accumulator this is most of its memory.
_VOCAB_BLOCK_BYTES = {"cpu": 8 << 20, "gpu": 64 << 20, "tpu": 64 << 20}


# Classes "lean" keeps together in its strided blocks, by backend (`blocks`): a TPU
# tiles an array's two minor dimensions by (8, 128), and runs of 8 rows of `w` keep
# each block made of whole tiles (compiled for a v5p, Llama-3 head, N=8192, bf16:
# 2138 MiB temp with single rows — `w` and dw re-laid out — and 130 MiB with runs of 8
# in blocks of 1336 classes; 129 MiB in today's blocks of 768, `VOCAB_SHARDS`).
_VOCAB_GROUP = {"tpu": 8}


def vocab_group(block: int, backend: str | None = None) -> int:
    """Classes per run of "lean"'s blocks on `backend`: the backend's group, halved
    until it divides `block` (1 when there is none)."""
    group = _VOCAB_GROUP.get(backend or jax.default_backend(), 1)
    while block % group:
        group //= 2
    return group


# Runs per block that "lean" prefers a multiple of (`dividing_block`). Its blocks are
# strided: `w` viewed as (runs, blocks, group, D), block i = [:, i]. When w's rows are
# split over S devices and S divides the runs, that view is split like `w` itself;
# otherwise XLA gathers all of `w` to form it (under jax.jit on NamedSharding inputs,
# 4 vocabulary shards and blocks of 251 runs: every device gathered the whole of `w`).
# 8 covers vocabulary splits over 2, 4 or 8 devices.
VOCAB_SHARDS = 8


def default_vocab_block_size(num_tokens: int, vocab: int, backend: str | None = None) -> int:
    """Classes per block for "lean": the most whose (N, Bv) float32 logits fit the
    backend's budget (128 to 8192, at most V), lowered to a divisor of V (`dividing_block`,
    with the backend's `vocab_group`): then `w` is viewed as blocks with no padded copy of
    it, and split like `w` when w's rows are split over up to VOCAB_SHARDS devices."""
    backend = backend or jax.default_backend()
    budget = _VOCAB_BLOCK_BYTES.get(backend, _VOCAB_BLOCK_BYTES["gpu"])
    block = max(budget // (4 * max(num_tokens, 1)), 128)
    return dividing_block(vocab, block, 8192, multiple=_VOCAB_GROUP.get(backend, 1))


def dividing_block(vocab: int, block: int, largest: int | None = None, multiple: int = 1) -> int:
    """`block` (at most `largest` and V), lowered to a divisor of V when one is close:
    by preference the largest divisor in [block / 2, block] — else [block / 4, block] —
    whose runs (block / `multiple`, the group) are a multiple of VOCAB_SHARDS; else the
    largest in [block / 2, block] that is a multiple of `multiple`; else any divisor
    there; else `block` itself. A block that divides V lets "lean" view `w` as
    (Bv, nb, D) blocks in place; otherwise V is padded, which copies `w`."""
    block = max(1, min(block, largest or block, vocab))

    lowest = max(1, -(-block // 4))
    far = [vocab // k for k in range(-(-vocab // block), vocab // lowest + 1) if vocab % k == 0]
    near = [b for b in far if 2 * b >= block]  # largest first, as `far`
    shardable = multiple * VOCAB_SHARDS
    for found in (
        [b for b in near if b % shardable == 0],
        [b for b in far if b % shardable == 0],
        [b for b in near if b % multiple == 0],
        near,
    ):
        if found:
            return found[0]
    return block


def _static(options: dict, return_aux: bool, sub_blocks: int = 1) -> chunked.Static:
    """Trace-time options; a scalar option given as an array is carried as an operand."""
    ls, zl = options["label_smoothing"], options["z_loss"]
    return chunked.Static(
        softcap=options["softcap"],
        ignore_index=options["ignore_index"],
        label_smoothing=ls if isinstance(ls, float) else None,
        z_loss=zl if isinstance(zl, float) else None,
        vocab_axis_name=options["vocab_axis_name"],
        with_argmax=return_aux,
        sub_blocks=sub_blocks,
    )


def _chunked(
    x,
    w,
    labels,
    *,
    bias,
    logit_mask,
    position_mask,
    options,
    reduction,
    return_aux,
    batch_axis_name,
    block_size,
    kernel=None,
):
    mesh.check_split_over(w, options["vocab_axis_name"], "chunked")
    lead = x.shape[:-1]
    n, vocab = math.prod(lead), w.shape[0]
    block, sub = block_size if isinstance(block_size, tuple) else (block_size, None)
    mm_itemsize = jnp.dtype(jnp.result_type(x.dtype, w.dtype)).itemsize
    block = block or default_block_size(n, vocab, itemsize=mm_itemsize)
    sub = sub or default_sub_block(block, vocab, itemsize=mm_itemsize)
    num_blocks = max(1, -(-n // block))  # an empty batch runs one all-padding block
    pmask = jnp.ones(lead, bool) if position_mask is None else position_mask
    st = _static(options, return_aux, block // sub)._replace(
        row_kernel=kernel,
        # Asked here, after manual_if_explicit: under its shard_map the axes are Manual.
        partitioned=xla_partitions(
            x, w, labels, bias, logit_mask, position_mask, options["class_weights"]
        ),
    )
    ops = chunked.Operands(
        x=strided_blocks(x.reshape(n, x.shape[-1]), num_blocks, block),
        w=w,
        bias=bias,
        labels=strided_blocks(labels.reshape(n), num_blocks, block),
        position_mask=strided_blocks(pmask.reshape(n), num_blocks, block, fill=False),
        logit_mask=strided_blocks(
            None if logit_mask is None else logit_mask.reshape(n, w.shape[0]),
            num_blocks,
            block,
            fill=False,
        ),
        class_weights=options["class_weights"],
        ls=None if st.label_smoothing is not None else options["label_smoothing"],
        zl=None if st.z_loss is not None else options["z_loss"],
    )

    def to_positions(a):
        return unblock(a, n).reshape(lead)

    if reduction == "none":
        rows = jax.tree.map(to_positions, chunked.token_rows(st, ops))
        loss = rows.loss
    else:
        total, rows = chunked.token_sum(st, ops)
        rows = jax.tree.map(to_positions, rows)
        total = total if batch_axis_name is None else lax.psum(total, batch_axis_name)
        loss = total
    rows = jax.tree.map(lax.stop_gradient, rows)  # only the loss carries a gradient

    def mean(total):
        return weighted_mean(total, *stacked_sums([rows.weight, rows.valid], batch_axis_name))

    if reduction == "mean":
        loss = mean(loss)
    if not return_aux:
        return loss
    z_loss = rows.z_loss if reduction == "none" else global_sum(rows.z_loss, batch_axis_name)
    if reduction == "mean":
        z_loss = mean(z_loss)
    return loss, aux_from_rows(rows, z_loss, batch_axis_name)


def _lean(
    x,
    w,
    labels,
    *,
    bias,
    logit_mask,
    position_mask,
    options,
    reduction,
    return_aux,
    batch_axis_name,
    block_size,
    fused=None,
    kernel=None,
):
    mesh.check_split_over(w, options["vocab_axis_name"], "lean")
    n, vocab = math.prod(x.shape[:-1]), w.shape[0]
    if block_size:
        block = dividing_block(vocab, block_size, multiple=vocab_group(block_size))
    else:
        block = default_vocab_block_size(n, vocab)
    num_blocks = -(-vocab // block)
    group = vocab_group(block)

    def by_block(a, axis=0, fill=0):
        return strided_blocks(a, num_blocks, block, axis, fill, group)

    # Labels become block-ordered ids; `ignore_index` is applied to the original ids first.
    st = _static(options, return_aux)._replace(
        ignore_index=None,
        fused=fused,
        group=group,
        padded=num_blocks * block != vocab,
        # Where XLA partitions the call (Auto mesh axes), XLA's two reads: it splits
        # them without a collective per block, where the one-read reduction gathers
        # per-position partials in every block (`python -m benchmarks.sharding`: +2 to
        # +8 MiB per step on 8 H100s).
        row_kernel=None
        if xla_partitions(x, w, labels, bias, logit_mask, position_mask, options["class_weights"])
        else kernel,
    )
    labels = labels.reshape(n)
    pmask = jnp.ones((n,), bool) if position_mask is None else position_mask.reshape(n)
    pmask = kept_positions(labels, pmask, options["ignore_index"])
    ops = lean.Operands(
        x=x.reshape(n, x.shape[-1]),
        w=by_block(w),
        bias=by_block(bias),
        class_weights=by_block(options["class_weights"]),
        class_mask=by_block(jnp.ones((vocab,), bool), fill=False),
        labels=lean.block_order(labels, vocab, num_blocks, block, group),
        position_mask=pmask,
        logit_mask=None if logit_mask is None else by_block(logit_mask.reshape(n, vocab), 1, False),
        ls=None if st.label_smoothing is not None else options["label_smoothing"],
        zl=None if st.z_loss is not None else options["z_loss"],
    )
    rows = jax.tree.map(lambda a: a.reshape(x.shape[:-1]), lean.vocab_rows(st, ops))
    rows = rows._replace(
        **{
            k: lax.stop_gradient(v)
            for k, v in rows._asdict().items()
            if k != "loss" and v is not None
        }
    )
    return finish(rows, reduction, return_aux, batch_axis_name)


def _pallas(x, w, labels, *, options, block_size, kernel, **kwargs):
    """The scheme of "lean" with each block's logits formed on chip by the fused-head
    kernels (`jaxent.pallas.fused_head`); `kernel` is the `pallas.choose` of the call."""
    if options["vocab_axis_name"] is not None:
        raise NotImplementedError(
            "implementation='pallas' for linear_cross_entropy does not take "
            "`vocab_axis_name` yet; use 'chunked' or 'lean' (None picks 'chunked')."
        )
    config = fused_head.Config(
        softcap=options["softcap"],
        smoothing=False,  # set per call from the options by lean
        with_argmax=False,
        interpret=kernel.interpret,
        block_rows=kernel.block_rows,
        block_classes=kernel.block_classes,
        block_depth=kernel.block_depth,
        mosaic=kernel.mosaic,
    )
    return _lean(x, w, labels, options=options, block_size=block_size, fused=config, **kwargs)


_IMPLS = {
    "xla": linear_cross_entropy_xla,
    "chunked": _chunked,
    "lean": _lean,
    "pallas": _pallas,
}
# What None tries, best first. "pallas" is not among them until a GPU measurement shows
# it beats "chunked" (three matmuls; it computes four, as "lean" does).
_ORDER = ("chunked", "xla")

_STATIC = (
    "implementation",
    "kernel",
    "block_size",
    "where_kind",
    "reduction",
    "return_aux",
    "softcap",
    "ignore_index",
    "ls_static",
    "zl_static",
    "vocab_axis_name",
    "batch_axis_name",
)


@functools.partial(jax.jit, static_argnames=_STATIC)
@manual_if_explicit(HIDDEN, TABLE, POSITIONS, CLASSES, WHERE, CLASSES)
def _linear_cross_entropy(
    x,
    w,
    labels,
    bias,
    where,
    class_weights,
    ls,
    zl,
    *,
    implementation,
    kernel,
    block_size,
    where_kind,
    reduction,
    return_aux,
    softcap,
    ignore_index,
    ls_static,
    zl_static,
    vocab_axis_name,
    batch_axis_name,
):
    logit_mask = where if where_kind == "logits" else None
    position_mask = where if where_kind == "positions" else None
    if logit_mask is not None:
        logit_mask = jnp.broadcast_to(logit_mask, x.shape[:-1] + (w.shape[0],))
    if position_mask is not None:
        position_mask = jnp.broadcast_to(position_mask, x.shape[:-1])
    options = dict(
        ignore_index=ignore_index,
        class_weights=class_weights,
        softcap=softcap,
        label_smoothing=ls_static if ls is None else ls,
        z_loss=zl_static if zl is None else zl,
        vocab_axis_name=vocab_axis_name,
    )
    kwargs = dict(
        bias=bias,
        logit_mask=logit_mask,
        position_mask=position_mask,
        options=options,
        reduction=reduction,
        return_aux=return_aux,
        batch_axis_name=batch_axis_name,
    )

    def run(name):
        blocks = {"block_size": block_size} if name in ("chunked", "lean", "pallas") else {}
        if name in ("chunked", "lean", "pallas"):
            blocks["kernel"] = kernel
        return _IMPLS[name](x, w, labels, **kwargs, **blocks)

    if implementation is not None:
        return run(implementation)
    for name in _ORDER:
        try:
            return run(name)
        except NotImplementedError:
            continue
    raise AssertionError("unreachable: 'xla' serves every call")


def linear_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
    ignore_index: int | None = None,
    class_weights: jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
    z_loss: float | jax.Array = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    return_aux: bool = False,
    implementation: str | None = None,
    block_size: int | tuple[int, int] | None = None,
    vocab_axis_name: Any = None,
    batch_axis_name: Any = None,
):
    r"""Fused output projection and cross-entropy: `cross_entropy(x @ w.T + bias, labels)`.

    .. math:: \mathrm{logits}_{n,v} = \textstyle\sum_d x_{n,d} w_{v,d} + b_v

    then every option exactly as in `cross_entropy` (class axis last), without ever
    holding the (N, V) logits or their gradient, except with implementation="xla".

    Args:
      x: (..., D) hidden states, floating.
      w: (V, D) output embedding — the layout of an embedding table and of
        `torch.nn.Linear.weight`; pass a Flax `Dense` kernel (D, V) as `kernel.T`
        (free under jit).
      labels: integer class ids, `x.shape[:-1]`.
      bias: (V,) or None.
      axis: the class axis of the logits x @ w.T + bias, which is the last one: only
        -1 (or its positive equivalent) is accepted; it is here so that calls written
        with `cross_entropy`'s options carry over.
      where: bool, `x.shape[:-1]` (drops positions) or `x.shape[:-1] + (V,)` (drops
        logits).
      ignore_index, class_weights, label_smoothing, z_loss, softcap, reduction,
      return_aux, vocab_axis_name, batch_axis_name: as in `cross_entropy`. With
        `vocab_axis_name`, `w`, `bias` and `class_weights` hold this shard's rows.
      implementation: None ("chunked", or "xla" where it cannot serve, e.g. under
        `pmap`), "xla" (the materialised reference),
        "chunked" (pure JAX, token blocks, `custom_vjp`),
        "lean" (pure JAX, vocabulary blocks: the least memory, one extra matmul),
        "pallas" ("lean"'s scheme with each tile of logits formed on chip by the
        kernels of `jaxent.pallas.fused_head` — Triton on CUDA GPUs, Mosaic on TPUs
        (`fused_head_tpu`); no `vocab_axis_name`; NotImplementedError where it cannot
        serve, as for `cross_entropy`).
      block_size: for "chunked", tokens per block (default `default_block_size`), or a
        pair (tokens per block, tokens per sub-block; the second divides the first,
        default `default_sub_block`): each block's logit gradient (block x V, matmul
        dtype) feeds the dx and dw matmuls, its float32 logits are formed a sub-block
        at a time. For "lean" and "pallas", classes per block (default
        `default_vocab_block_size`; lowered to a divisor of V by `dividing_block` when
        one is close, so `w` is used in place — and split like `w` under jit when its
        rows are split over up to 8 devices).

    Gradients flow to x, w and bias (in their dtypes; dw is accumulated in float32)
    and to `label_smoothing` and `z_loss` given as arrays, not to `class_weights`.
    The matmuls run in the inputs' dtype with float32 accumulation. aux carries no
    gradient.

    Memory ("chunked"): one sub-block of float32 logits and one block of their
    gradient in the matmul dtype, plus a float32 dw accumulator (V x D) when
    differentiating with reduction "sum"/"mean" (the logit gradient is formed in the
    forward pass: 3 matmuls); reduction "none" recomputes the logits in the backward
    pass (4 matmuls). "lean": one
    (N, Bv) block of float32 logits and a float32 dx accumulator (N x D), never a
    float32 copy of w; the backward recomputes the logits (4 matmuls).
    """
    x = _checks.check_floating("x", x)
    w = _checks.check_floating("w", w)
    if x.ndim < 1:
        raise ValueError("`x` must have shape (..., D), got a scalar.")
    if w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"`w` must have shape (V, D) with D = x.shape[-1] = {x.shape[-1]}, got {w.shape}. "
            "A Flax Dense kernel of shape (D, V) is passed as `kernel.T`."
        )
    vocab = w.shape[0]
    _checks.check_num_classes("w", vocab, f"rows of shape {w.shape}")
    positions = x.shape[:-1]
    if _checks.check_axis(axis, len(positions) + 1, "the logits x @ w.T") != len(positions):
        raise ValueError(
            f"`axis` must be -1 for linear_cross_entropy (the classes are the last axis "
            f"of x @ w.T), got {axis}."
        )
    labels = _checks.check_integer("labels", labels)
    _checks.check_shape("labels", labels, positions, "It must be `x.shape[:-1]`.")
    if bias is not None:
        bias = _checks.check_floating("bias", bias)
        _checks.check_shape("bias", bias, (vocab,), "It holds one value per row of `w`.")
    implementation = _checks.check_implementation(implementation, IMPLEMENTATIONS)
    block_size = _checks.check_block_size(block_size, implementation)
    ls_static, ls = _checks.check_scalar_option(
        "label_smoothing", label_smoothing, low=0.0, high=1.0
    )
    zl_static, zl = _checks.check_scalar_option("z_loss", z_loss, low=0.0)
    # The kernel choice depends on context (`jaxent.pallas.interpret_mode`, `tiles`):
    # made here, outside jit, and passed as a static argument (part of the cache key).
    if implementation == "pallas":  # the fused-head kernels' (or raises)
        kernel = pallas.choose("pallas", jnp.result_type(x.dtype, w.dtype))
    elif implementation in (None, "chunked", "lean"):  # the row statistics of its logits
        kernel = pallas.choose(None, logits_dtype(x, w))
    else:
        kernel = None
    return _linear_cross_entropy(
        x,
        w,
        labels,
        bias,
        None if where is None else jnp.asarray(where),
        _checks.check_class_weights(class_weights, vocab, "the rows of `w`"),
        ls,
        zl,
        implementation=implementation,
        kernel=kernel,
        block_size=block_size,
        where_kind=split_where(where, positions + (vocab,), positions, len(positions)),
        reduction=_checks.check_reduction(reduction),
        return_aux=_checks.check_bool("return_aux", return_aux),
        softcap=_checks.check_positive_or_none("softcap", softcap),
        ignore_index=_checks.check_ignore_index(ignore_index, labels),
        ls_static=ls_static,
        zl_static=zl_static,
        **_checks.check_axis_names(vocab_axis_name, batch_axis_name),
    )
