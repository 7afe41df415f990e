"""A bounds check for the Triton kernels' masked loads and stores, in the interpreter.

Compiled, a Triton load or store touches exactly the addresses its mask lets through:
an element past the array's end that the mask does not drop reads or overwrites
whatever lies there. The Pallas interpreter cannot show that: it pads each ref to the
slice and discards writes into the padding, so a kernel that forgets a mask still gives
the right numbers on CPU (stop 23's mutation check: dropping the fused-head gradient
store's class mask passed every interpreted test).

`checked()` wraps `plgpu.load` / `plgpu.store` while a kernel is traced: each access
also computes, on its tile, `mask & ~in_bounds` from the ref view's slices and the
array's shape, and reports through `jax.debug.callback` whether any element was let
through out of bounds. The kernels' numbers are unchanged.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass
class Accesses:
    """What `checked` saw: how many (traced) accesses it checked, how many tiles ran
    through them, and a description of each access that went out of bounds."""

    traced: int = 0
    tiles: int = 0
    out_of_bounds: list = dataclasses.field(default_factory=list)


def _in_bounds(view):
    """(view shape) bool: which elements of a ref view lie inside its array. A plain
    ref is all inside; a view is one `NDIndexer` of slices (how the kernels index)."""
    if not hasattr(view, "transforms"):
        return jnp.ones(view.shape, bool)
    (indexer,) = view.transforms
    inside = jnp.ones((), bool)
    for dim, (index, size) in enumerate(zip(indexer.indices, indexer.shape, strict=True)):
        ids = index.start + index.stride * jnp.arange(index.size, dtype=jnp.int32)
        shape = [1] * len(indexer.indices)
        shape[dim] = index.size
        inside = inside & ((ids >= 0) & (ids < size)).reshape(shape)
    return jnp.broadcast_to(inside, view.shape)


@contextlib.contextmanager
def checked(monkeypatch):
    """Within this context, every `plgpu.load`/`plgpu.store` traced is bounds-checked
    (see the module docstring); yields the `Accesses` record. jax's caches are
    cleared first, so the losses trace again (a function jitted before would keep
    its unchecked kernels)."""
    jax.clear_caches()
    record = Accesses()
    load, store = plgpu.load, plgpu.store

    def check(kind, view, mask):
        record.traced += 1
        inside = _in_bounds(view)
        allowed = jnp.broadcast_to(True if mask is None else mask, inside.shape)
        escaped = jnp.sum(allowed & ~inside)
        where = f"{kind} of a {view.shape} view of a {getattr(view, 'ref', view).shape} ref"

        def note(count):
            record.tiles += 1
            if int(np.asarray(count)):
                record.out_of_bounds.append(f"{where}: {int(np.asarray(count))} elements")

        jax.debug.callback(note, escaped)

    def checked_load(view, *, mask=None, **options):
        check("load", view, mask)
        return load(view, mask=mask, **options)

    def checked_store(view, value, *, mask=None, **options):
        check("store", view, mask)
        return store(view, value, mask=mask, **options)

    monkeypatch.setattr(plgpu, "load", checked_load)
    monkeypatch.setattr(plgpu, "store", checked_store)
    yield record
