"""Strided blocks: how both block loops of `linear_cross_entropy` cut an axis.

An axis of length L is viewed as (block, num_blocks): entry j * num_blocks + i sits at
[j, i], so block i (index i of the new axis) holds entries i, i + nb, i + 2 nb, ... .
Without padding this is a reshape, no copy, and a split of the axis over devices
(contiguous entries per device) stays a split of every block: under `jit` with
sharded inputs XLA runs the block loop without gathering anything. "chunked" cuts the
tokens this way, "lean" the classes (and `w`'s rows). On a TPU "lean" keeps runs of 8
rows together (`group`): a TPU array is tiled (8, 128) over its two minor dimensions,
and XLA:TPU re-lays out a whole array indexed between them — for `w` and dw, two
(V, D) copies (`python -m benchmarks.deviceless --target v5p`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def strided_blocks(
    a: jax.Array | None, num_blocks: int, block: int, axis: int = 0, fill=0, group: int = 1
):
    """Split `axis` into (block, num_blocks), padding it with `fill` to block * num_blocks
    (a copy; only then). With `group` g > 1 (dividing `block`), runs of g consecutive
    entries stay together: the axis becomes (block / g, num_blocks, g), and block i holds
    the runs i, i + nb, i + 2 nb, ... (entry (j nb + i) g + k at [j, i, k])."""
    if a is None:
        return None
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, num_blocks * block - a.shape[axis])
    a = jnp.pad(a, pad, constant_values=fill)
    view = (block, num_blocks) if group == 1 else (block // group, num_blocks, group)
    return a.reshape(a.shape[:axis] + view + a.shape[axis + 1 :])


def take_block(a: jax.Array | None, i, axis: int = 1, group: int = 1):
    """Block i of a `strided_blocks` view, read where it lies (`axis` is num_blocks');
    its entries in order, the runs of a grouped view joined."""
    if a is None:
        return None
    b = lax.dynamic_index_in_dim(a, i, axis, keepdims=False)
    return b if group == 1 else b.reshape(b.shape[: axis - 1] + (-1,) + b.shape[axis + 1 :])


def put_block(buffer: jax.Array, value: jax.Array, i, axis: int = 1, group: int = 1):
    """Write block i into a `strided_blocks`-shaped buffer (in place inside a loop)."""
    if group > 1:
        runs = (value.shape[axis - 1] // group, group)
        value = value.reshape(value.shape[: axis - 1] + runs + value.shape[axis:])
    return lax.dynamic_update_index_in_dim(buffer, value, i, axis)


def unblock(a: jax.Array, n: int) -> jax.Array:
    """Per-block results stacked by a loop, (num_blocks, block), back to the first n
    entries in the order of the axis that was cut."""
    return jnp.swapaxes(a, 0, 1).reshape(-1)[:n]
