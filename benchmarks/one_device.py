"""The sharded code path on a mesh of one device, to show what it costs by itself.

`on_one_device(loss, in_specs)` calls `loss(*arrays, batch_axis_name="batch",
vocab_axis_name="vocab")` inside `jax.shard_map` over a 1 x 1 mesh: the collectives
are over one device, so any time above the unsharded call is the price of the sharded
code path (the psum/pmax plumbing, the shard offsets), not of communication.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXES = ("batch", "vocab")
LOGITS, POSITIONS, HIDDEN, TABLE = P("batch", "vocab"), P("batch"), P("batch", None), P("vocab")


def on_one_device(loss, in_specs, device=None):
    """`loss` under shard_map over a 1 x 1 mesh of `device` (default: JAX's first)."""
    mesh = Mesh(np.array([device or jax.devices()[0]]).reshape(1, 1), AXES)

    def body(*arrays):
        return loss(*arrays, batch_axis_name="batch", vocab_axis_name="vocab")

    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P())
