"""Strided blocks: how both block loops of `linear_cross_entropy` cut an axis.

An axis of length L is viewed as (block, num_blocks): entry j * num_blocks + i sits at
[j, i], so block i (index i of the new axis) holds entries i, i + nb, i + 2 nb, ... .
Without padding this is a reshape, no copy, and a split of the axis over devices
(contiguous entries per device) stays a split of every block: under `jit` with
sharded inputs XLA runs the block loop without gathering anything. "chunked" cuts the
tokens this way, "lean" the classes (and `w`'s rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def strided_blocks(a: jax.Array | None, num_blocks: int, block: int, axis: int = 0, fill=0):
    """Split `axis` into (block, num_blocks), padding it with `fill` to block * num_blocks
    (a copy; only then)."""
    if a is None:
        return None
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, num_blocks * block - a.shape[axis])
    a = jnp.pad(a, pad, constant_values=fill)
    return a.reshape(a.shape[:axis] + (block, num_blocks) + a.shape[axis + 1 :])


def take_block(a: jax.Array | None, i, axis: int = 1):
    """Block i of a `strided_blocks` view, read where it lies (`axis` is num_blocks')."""
    return None if a is None else lax.dynamic_index_in_dim(a, i, axis, keepdims=False)


def put_block(buffer: jax.Array, value: jax.Array, i, axis: int = 1) -> jax.Array:
    """Write block i into a `strided_blocks`-shaped buffer (in place inside a loop)."""
    return lax.dynamic_update_index_in_dim(buffer, value, i, axis)


def unblock(a: jax.Array, n: int) -> jax.Array:
    """Per-block results stacked by a loop, (num_blocks, block), back to the first n
    entries in the order of the axis that was cut."""
    return jnp.swapaxes(a, 0, 1).reshape(-1)[:n]
