"""Pallas kernels: the GPU (and TPU) fast paths of `cross_entropy`,
`soft_cross_entropy` and `linear_cross_entropy`, and how a call picks one.

Import-guarded: if `jax.experimental.pallas` or its Triton or TPU module cannot be
imported, `UNAVAILABLE` says why, every loss takes its XLA path, and nothing else
changes.

Which path a call takes (`choose`), for `implementation=`:
- "xla": XLA everywhere.
- "pallas": the kernel of the backend — Triton on a GPU (`row_stats.py`,
  `fused_head.py`), Mosaic on a TPU (`row_stats_tpu.py`, `fused_head_tpu.py`);
  `NotImplementedError` where none can serve (CPU, float64 logits, Pallas missing) —
  except inside `interpret_mode()`, where it runs in the Pallas interpreter on any
  backend.
- None: the GPU kernel when the computation is lowered for CUDA; on CPU XLA's two
  reads; on any other platform (TPU) XLA's one-read variadic reduction
  (`jaxent._one_read`, run through the kernel's wrapper: `row_stats.Config.xla`) —
  decided at lowering by `lax.platform_dependent`, so exporting for CUDA from a CPU
  host gets the kernel; XLA's two reads for float64 logits. Where XLA partitions the
  call over devices (Auto mesh axes, `_sharding.xla_partitions`), CUDA takes the
  one-read reduction too: XLA splits a reduction like any other op, but it has no rule
  for a Pallas call and would gather the logits onto every device to run it. The TPU
  kernel stays opt-in until a TPU timing shows it ahead: compiled for a v5p it moves
  what the one-read reduction moves (3 logits-sized passes), and it has never run on
  one.

The GPU kernels lower with Triton (not Mosaic GPU, this jax's default GPU lowering):
Triton has masked loads, so any class count and any number of rows run without
padding copies, and it runs on the GPUs Triton supports (Ampere as well as Hopper, and
ROCm), where Mosaic GPU targets Hopper and later with TMA-shaped tiles. Triton does
not lower for TPU: the TPU kernel is the same computation in Mosaic TPU's block form.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

try:
    from jax.experimental import pallas as _pallas  # noqa: F401
    from jax.experimental.pallas import tpu as _tpu  # noqa: F401
    from jax.experimental.pallas import triton as _triton  # noqa: F401
except Exception as err:  # ImportError, or a jax build whose Pallas fails to load
    UNAVAILABLE: str | None = f"jax.experimental.pallas cannot be imported ({err})"
else:
    UNAVAILABLE = None


class Kernel(NamedTuple):
    """The static kernel choice of one call (part of the jit cache key).

    auto: pick by platform at lowering (`row_stats.on_cuda`);
    interpret: run in the Pallas interpreter; block_rows / block_classes: tile
    overrides (None: `row_stats.tile_sizes`, `fused_head.tile_sizes`,
    `row_stats_tpu.tile_sizes`); block_depth: the hidden size per step of the
    fused-head kernels' matmul loop (None: theirs); mosaic: the TPU kernel.
    """

    auto: bool = False
    interpret: bool = False
    block_rows: int | None = None
    block_classes: int | None = None
    block_depth: int | None = None
    mosaic: bool = False  # the TPU kernel (Mosaic) instead of the GPU one (Triton)


_INTERPRET: contextvars.ContextVar[Kernel | None] = contextvars.ContextVar(
    "jaxent_pallas_interpret", default=None
)


@contextlib.contextmanager
def interpret_mode(
    *,
    block_rows: int | None = None,
    block_classes: int | None = None,
    block_depth: int | None = None,
    platform: str = "gpu",
):
    """Within this context, jaxent's Pallas kernels run in the Pallas interpreter.

    The test hook: `implementation=None` and `"pallas"` then take the kernel on any
    backend (CPU in CI), with the same wrapper, custom VJP and dispatch as on a GPU.
    The mode is read when a loss is called and is part of its jit cache key, so
    compiled calls never leak between modes; a function of your own that you `jax.jit`
    keeps the mode it was traced in. `block_rows` / `block_classes` (powers of two)
    override the tile sizes, so small inputs can exercise several tiles, and
    `block_depth` the hidden size per matmul step of `linear_cross_entropy`'s kernels
    (which take no tile below 16, Triton's smallest dot). `platform="tpu"` interprets
    the TPU kernels instead of the GPU ones (which raise tiles to the TPU's: 8 or 32
    rows, 128 classes, 128 of depth). Slow: for tests.
    Inside `shard_map`, the interpreter needs `check_vma=False` (a limitation of
    jax's Pallas interpreter; compiled kernels do not).

        with jaxent.pallas.interpret_mode(block_classes=16):
            loss = jaxent.cross_entropy(logits, labels, implementation="pallas")
    """
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"`platform` must be 'gpu' or 'tpu', got {platform!r}.")
    with _mode(True, block_rows, block_classes, block_depth, platform == "tpu"):
        yield


@contextlib.contextmanager
def tiles(
    *,
    block_rows: int | None = None,
    block_classes: int | None = None,
    block_depth: int | None = None,
):
    """Within this context, the compiled kernels use these tile sizes (powers of two;
    None keeps the default; the fused-head kernels raise any size below 16, Triton's
    smallest dot, to 16): for tuning sweeps on a GPU (`python -m benchmarks.sweep`).
    Read at call time and part of the jit cache key, as `interpret_mode`."""
    with _mode(False, block_rows, block_classes, block_depth):
        yield


@contextlib.contextmanager
def _mode(interpret: bool, block_rows, block_classes, block_depth, mosaic=None):
    sizes = dict(block_rows=block_rows, block_classes=block_classes, block_depth=block_depth)
    for name, value in sizes.items():
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"`{name}` must be a power of two, got {value}.")
    if mosaic is None:  # compiled kernels: the backend's
        mosaic = jax.default_backend() == "tpu"
    token = _INTERPRET.set(Kernel(False, interpret, **sizes, mosaic=mosaic))
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def _why_not(dtype, interpret: bool) -> str | None:
    """Why the kernel cannot serve logits of `dtype` here, or None if it can."""
    if UNAVAILABLE is not None:
        return UNAVAILABLE
    if dtype == jnp.float64:
        return "float64 logits: the kernel computes in float32; use implementation='xla'"
    backend = jax.default_backend()
    if not interpret and backend not in ("gpu", "tpu"):
        return (
            f"the Pallas kernels lower for GPUs and TPUs, and the backend is {backend!r}"
            " (use implementation='xla' or None; tests use jaxent.pallas.interpret_mode())"
        )
    if not interpret and backend == "tpu" and dtype == jnp.float16:
        # Mosaic rejects float16 vectors ("Invalid vector type for load", for a v5p).
        return "float16 on a TPU: its kernels take bfloat16 or float32; use implementation='xla'"
    return None


def choose(implementation: str | None, dtype) -> Kernel | None:
    """The kernel a call with `implementation` and logits of `dtype` takes; None: XLA.

    Runs at the Python level, before the jit-compiled core; `implementation` was
    validated by `_checks.check_implementation`.
    """
    if implementation == "xla":
        return None
    mode = _INTERPRET.get()
    interpret = mode is not None and mode.interpret
    reason = _why_not(jnp.dtype(dtype), interpret)
    if implementation == "pallas":
        if reason is not None:
            raise NotImplementedError(f"implementation='pallas' cannot serve this call: {reason}.")
        return mode or Kernel(mosaic=jax.default_backend() == "tpu")
    if UNAVAILABLE is not None or dtype == jnp.float64:
        return None
    return mode if interpret else (mode or Kernel())._replace(auto=True)


def stats_for(
    kernel: Kernel | None, soft: bool = False, partitioned: bool = False, forward: bool = False
):
    """The row-statistics function of a choice: `_stable.logit_stats`'s signature
    (integer labels), or `_stable.soft_stats`'s with `soft` (probability targets).
    `partitioned`: XLA partitions the call over devices (`_sharding.xla_partitions`,
    asked where the loss core runs): the automatic choice then takes no Pallas call.
    `forward` (integer labels): a forward pass inside a `custom_vjp`'s forward rule,
    differentiated in forward mode for second derivatives, so without the one-pass
    custom backward (`row_stats.forward_stats`)."""
    from .. import _stable

    assert not (soft and forward), "forward-only statistics take integer labels"
    if kernel is None:
        if forward:
            return _stable.forward_logit_stats
        return _stable.soft_stats if soft else _stable.logit_stats
    from . import row_stats

    # (the kernel asked for, the automatic choice, the automatic choice where XLA
    # partitions the call)
    if forward:
        family = (row_stats.forward_stats, row_stats.platform_forward_stats,
                  row_stats.partitioned_forward_stats)  # fmt: skip
    elif soft:
        family = (row_stats.kernel_soft_stats, row_stats.platform_soft_stats,
                  row_stats.partitioned_soft_stats)  # fmt: skip
    else:
        family = (row_stats.kernel_stats, row_stats.platform_stats, row_stats.partitioned_stats)
    asked, automatic, automatic_partitioned = family
    tiles = dict(block_rows=kernel.block_rows, block_classes=kernel.block_classes)
    if kernel.auto:  # the GPU kernel, on CUDA only
        fn = automatic_partitioned if partitioned else automatic
    else:
        fn = asked
        tiles["mosaic"] = kernel.mosaic
    return functools.partial(fn, interpret=kernel.interpret, **tiles)


__all__ = ["UNAVAILABLE", "Kernel", "choose", "interpret_mode", "stats_for", "tiles"]
