"""Harness for the sharding tests: run one loss call sharded and on one device, compare.

A `Case` is a loss with its array arguments (each with the PartitionSpec it is split
by over the mesh axes ("batch", "vocab")) and its static options. Every run computes
the case's reductions at once (so one compiled program covers them) and the gradient
of Σ cot · none + 0.7 sum + 1.3 mean with respect to the `wrt` arrays. The oracle
is the same loss called on one device with the whole batch, itself tested against
float64 NumPy in the other test modules.

Routes: `jax.shard_map` with `vocab_axis_name`/`batch_axis_name`, and `jax.jit` on
`NamedSharding` inputs with Auto mesh axes (XLA partitions the loss) or Explicit ones
(`jax.make_mesh`'s default). Each route returns its outputs, its gradients and the
collectives of its compiled program (`benchmarks.hlo`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import hlo

from . import oracles

AXES = ("batch", "vocab")
MESHES = [(8, 1), (1, 8), (2, 4)]
REDUCTIONS = ("none", "sum", "mean")
AXIS_NAMES = dict(batch_axis_name="batch", vocab_axis_name="vocab")


@functools.cache
def mesh(shape: tuple, explicit: bool = False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, AXES, axis_types=(kind, kind))


class Case(NamedTuple):
    loss: Callable  # loss(**arrays, reduction=..., **options, **axis names)
    arrays: dict  # name -> (array, PartitionSpec)
    options: dict  # static keyword options
    wrt: tuple  # names of the arrays to differentiate
    per_position: P  # spec of non-scalar outputs ("none" losses, aux.lse)
    reductions: tuple = REDUCTIONS  # computed together, in one program


def _all_reductions(case: Case, **axis_names):
    def run(arrays):
        return {r: case.loss(**arrays, reduction=r, **case.options, **axis_names)
                for r in case.reductions}  # fmt: skip

    return run


def _loss_only(out):
    return out[0] if isinstance(out, tuple) else out


def _value_and_grad(run, wrt, cot):
    def objective(diff, rest):
        outs = run({**rest, **diff})
        loss = {r: _loss_only(out) for r, out in outs.items()}
        total = 0.7 * loss.get("sum", 0.0) + 1.3 * loss.get("mean", 0.0)
        if "none" in loss:  # jnp.vdot would be ambiguous with Explicit axes
            total = total + jnp.sum(cot * loss["none"])
        return total, outs

    def f(arrays):
        diff = {k: arrays[k] for k in wrt}
        rest = {k: v for k, v in arrays.items() if k not in wrt}
        (_, outs), grads = jax.value_and_grad(objective, has_aux=True)(diff, rest)
        return outs, grads

    return f


def _cotangent(want):
    """A fixed random cotangent for the "none" losses (shape from the oracle's outputs)."""
    shape = _loss_only(want[0]["none"]).shape if "none" in want[0] else ()
    return jax.random.normal(jax.random.PRNGKey(42), shape, jnp.float32)


def _values(case: Case) -> dict:
    return {k: v for k, (v, _) in case.arrays.items()}


def _compile(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled(*args), hlo.collectives(compiled.as_text())


def single_device(case: Case):
    """(outputs, gradients) of the loss on one device, on the whole batch."""
    out_shapes = jax.eval_shape(_all_reductions(case), _values(case))
    f = _value_and_grad(_all_reductions(case), case.wrt, _cotangent((out_shapes,)))
    return jax.jit(f)(_values(case))


def in_shard_map(case: Case, mesh_shape, want):
    """(outputs, gradients), collectives: inside shard_map, with both axis names.
    `want` (the single-device result) gives the outputs' structure."""
    specs = {k: s for k, (_, s) in case.arrays.items()}
    out_specs = jax.tree.map(lambda a: case.per_position if a.ndim else P(), want[0])
    sharded = jax.shard_map(
        _all_reductions(case, **AXIS_NAMES),
        mesh=mesh(mesh_shape),
        in_specs=(specs,),
        out_specs=out_specs,
    )
    return _compile(_value_and_grad(sharded, case.wrt, _cotangent(want)), _values(case))


def under_jit(case: Case, mesh_shape, explicit: bool, want):
    """(outputs, gradients), collectives: `jax.jit` on NamedSharding inputs, no axis names."""
    m = mesh(mesh_shape, explicit)
    arrays = {k: jax.device_put(v, NamedSharding(m, s)) for k, (v, s) in case.arrays.items()}
    cot = _cotangent(want)
    cot = jax.device_put(cot, NamedSharding(m, case.per_position if cot.ndim else P()))
    # Explicit axes run under `jax.set_mesh`, as users of them do: arrays the loss
    # creates itself (masks, zeros) are then typed as replicated over the mesh.
    with jax.set_mesh(m) if explicit else contextlib.nullcontext():
        return _compile(_value_and_grad(_all_reductions(case), case.wrt, cot), arrays)


def assert_same(got, want, tol=1e-5):
    """Same tree, dtypes and shapes; floats within `tol` relative error, ints equal."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, a, b in zip(
        jax.tree_util.tree_flatten_with_path(want)[0],
        jax.tree.leaves(got),
        jax.tree.leaves(want),
        strict=True,
    ):
        where = jax.tree_util.keystr(path[0])
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if jnp.issubdtype(b.dtype, jnp.floating):
            assert np.all(np.isfinite(b)), where  # a case must not hide behind inf/NaN
            assert oracles.rel_err(a, b) < tol, (where, oracles.rel_err(a, b))
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
