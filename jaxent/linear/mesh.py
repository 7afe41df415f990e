"""Helpers for custom_vjp code inside `shard_map`: which mesh axes a value varies over.

Autodiff tracks this itself; a hand-written `custom_vjp` must (a) give fresh scan
accumulators the varying axes of their updates and (b) sum a cotangent over the mesh
axes its primal input is replicated on.
"""

from __future__ import annotations

import jax
from jax import lax

from .._sharding import axis_names


def varying_axes(a) -> frozenset:
    """Mesh axes over which `a` varies inside `shard_map` (empty outside)."""
    return frozenset(jax.typeof(a).manual_axis_type.varying)


def varying_like(zeros: jax.Array, refs, summed_over=None) -> jax.Array:
    """Give a fresh accumulator the mesh axes its updates vary over (any operand can
    enter them, except an axis `summed_over` by a psum before the update): `lax.scan`
    needs equal carry types under `shard_map`."""
    missing = frozenset().union(*map(varying_axes, refs)) - varying_axes(zeros)
    missing -= frozenset(axis_names((summed_over,)))
    return lax.pcast(zeros, tuple(sorted(missing)), to="varying") if missing else zeros


def check_split_over(w: jax.Array, vocab_axis_name, implementation: str) -> None:
    """Raise NotImplementedError unless `w` varies over the mesh axes `vocab_axis_name`
    names (so None falls back to "xla", which autodiff keeps right).

    The hand-written backwards read which axes a value varies over from its type, and
    `shard_map(..., check_vma=False)` and `pmap` leave that empty: they would sum the
    gradient of x over the vocabulary axis twice. A `w` that holds this shard's rows,
    as `vocab_axis_name` says, varies over the axis whenever it is tracked.
    """
    missing = frozenset(axis_names((vocab_axis_name,))) - varying_axes(w)
    if missing:
        raise NotImplementedError(
            f"implementation={implementation!r} with `vocab_axis_name={vocab_axis_name!r}` "
            f"needs the mesh axes {sorted(missing)} tracked in `w`'s type; inside "
            "`jax.pmap` or `jax.shard_map(..., check_vma=False)` they are not, and the "
            "gradient of x would be summed twice. implementation=None falls back to "
            "'xla' there; or use shard_map's default check_vma=True."
        )


def sum_to_primal_axes(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent of an input replicated over a mesh axis is the sum of the shards'
    partial cotangents (e.g. dw over a data-parallel axis); autodiff inserts this psum
    itself, a `custom_vjp` backward must do it."""
    extra = varying_axes(ct) - varying_axes(primal)
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct
