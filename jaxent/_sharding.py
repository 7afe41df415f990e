"""Explicitly sharded inputs under `jax.jit`: the loss runs itself under `shard_map`.

With `jax.make_mesh`'s default (Explicit) axis types an array's type carries its
sharding, and JAX refuses an operation whose output sharding it cannot resolve
without collectives — such as gathering each label's logit from a class axis split
over devices (a `ShardingTypeError`). Inside `shard_map` with `vocab_axis_name` /
`batch_axis_name` the losses need no such guess, and only per-position statistics
cross devices. So when the caller passes no axis names and the inputs' types are
explicitly sharded, `manual_if_explicit` reads the mesh axes off the types and runs
the same loss core under `shard_map` with those names (SPEC §6: the single-device
result). Inputs whose types carry no sharding (Auto mesh axes, one device, inside
the caller's own `shard_map`) go to the core unchanged, and XLA partitions it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# How each positional array argument of a loss core is laid out.
LOGITS = "logits"  # positions with the class axis at `axis` (class axis last if no `axis`)
POSITIONS = "positions"  # positions only: labels, a positions mask
CLASSES = "classes"  # (C,): class weights, bias
HIDDEN = "hidden"  # positions, then features: `x` of linear_cross_entropy
TABLE = "table"  # (C, D): `w` of linear_cross_entropy
WHERE = "where"  # LOGITS or POSITIONS, as the static `where_kind` says
REPLICATED = None  # scalars and absent (None) arguments


def explicit_spec(a) -> tuple | None:
    """`a`'s PartitionSpec over Explicit mesh axes, one entry per dimension; None if
    its type carries no such sharding."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                if t == AxisType.Explicit}  # fmt: skip
    spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    used = set(axis_names(spec))
    return spec if used and used <= explicit else None


def xla_partitions(*arrays) -> bool:
    """Whether XLA's partitioner may split a computation on `arrays` over devices: one
    array's type, or the mesh of a `jax.set_mesh` context, has an Auto axis of more
    than one device (None entries are skipped). A Pallas kernel has no partitioning
    rule, so XLA would gather its operands whole onto every device: such calls take an
    XLA path instead. Asked where a loss core runs, after `manual_if_explicit`: False
    on one device, for Explicit axes (the core then runs under `shard_map`) and inside
    `shard_map` over every axis (Manual axes). Not seen: `jax.jit(in_shardings=...)`
    on arrays placed on no mesh, whose types name none (the README says what to do)."""
    meshes = [getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
              for a in arrays if a is not None]  # fmt: skip
    meshes.append(jax.sharding.get_abstract_mesh())
    return any(
        t == AxisType.Auto and size > 1
        for mesh in meshes
        if mesh is not None and mesh.axis_names
        for size, t in zip(mesh.axis_sizes, mesh.axis_types, strict=True)
    )


def axis_names(entries) -> tuple:
    """The mesh axis names in PartitionSpec entries, flattened, in order."""
    names = []
    for entry in entries:
        if entry is not None:
            names += list(entry) if isinstance(entry, tuple) else [entry]
    return tuple(names)


class Layout(NamedTuple):
    """Where a call's positions and classes are split, as PartitionSpec entries."""

    mesh: object
    positions: tuple  # one entry per position dimension
    classes: object  # the class axis' entry
    class_axis: int  # where LOGITS arguments keep their class axis
    positions_shape: tuple
    num_classes: int

    def shape(self, role) -> tuple | None:
        """The full shape of a LOGITS or POSITIONS argument (a `where` may broadcast)."""
        pos = self.positions_shape
        if role == LOGITS:
            return pos[: self.class_axis] + (self.num_classes,) + pos[self.class_axis :]
        return pos if role == POSITIONS else None

    def spec(self, role) -> P:
        pos, cls, axis = self.positions, self.classes, self.class_axis
        if role == LOGITS:
            return P(*pos[:axis], cls, *pos[axis:])
        return {
            POSITIONS: P(*pos),
            CLASSES: P(cls),
            HIDDEN: P(*pos, None),
            TABLE: P(cls, None),
            REPLICATED: P(),
        }[role]

    def axis_names(self) -> dict:
        def one(names):
            return None if not names else names[0] if len(names) == 1 else names

        return dict(
            vocab_axis_name=one(axis_names((self.classes,))),
            batch_axis_name=one(axis_names(self.positions)),
        )


def layout_of(args, roles, axis) -> Layout | None:
    """The layout read off the arguments' types; None when none is explicitly sharded.

    The positions' split comes from the anchor (the LOGITS / HIDDEN argument) when its
    type is sharded, else from the first other argument that shows it (labels, a
    full-shaped `where`); the classes' split from the TABLE, the anchor, then the
    class-shaped arguments. Every argument is then resharded to this one layout, so
    mixed layouts (replicated logits with sharded labels, say) give the single-device
    result instead of a sharding type error deep inside the loss.
    """
    anchor = next(i for i, r in enumerate(roles) if r in (LOGITS, HIDDEN))
    specs = [None if a is None or r is REPLICATED else explicit_spec(a)
             for a, r in zip(args, roles, strict=True)]  # fmt: skip
    sharded = [i for i, spec in enumerate(specs) if spec is not None]
    if not sharded:
        return None
    shape = args[anchor].shape
    if roles[anchor] == LOGITS:
        positions_shape, num_classes = shape[:axis] + shape[axis + 1 :], shape[axis]
    else:
        axis = args[anchor].ndim - 1
        positions_shape, num_classes = shape[:-1], args[roles.index(TABLE)].shape[0]
    layout = Layout(None, None, None, axis, positions_shape, num_classes)

    def split(i):
        """(positions entries, class entry) that argument i shows; None where it shows
        nothing (unsharded, a broadcast `where`, an unrelated role)."""
        spec, role, a = specs[i], roles[i], args[i]
        if spec is None or (role in (LOGITS, POSITIONS) and a.shape != layout.shape(role)):
            return None, None
        if role == LOGITS:
            return spec[:axis] + spec[axis + 1 :], spec[axis]
        if role == HIDDEN:
            return spec[:-1], None
        if role == POSITIONS:
            return spec, None
        return None, spec[0]  # TABLE, CLASSES

    order = [anchor] + [i for i in sharded if i != anchor]
    positions = next((p for p in (split(i)[0] for i in order) if p is not None), None)
    table_first = sorted(order, key=lambda i: roles[i] != TABLE)
    classes = next((c for c in (split(i)[1] for i in table_first) if c is not None), None)
    positions = positions or (None,) * len(positions_shape)
    mesh = jax.typeof(args[sharded[0]]).sharding.mesh
    classes = _without(classes, set(axis_names(positions)))
    return layout._replace(mesh=mesh, positions=positions, classes=classes)


def _without(entry, taken: set):
    """A PartitionSpec entry less the mesh axes in `taken`.

    With w's rows split over the axis that also splits x's positions (FSDP / ZeRO-3:
    the head's weights sharded over the data axis) one mesh axis cannot split both;
    the positions keep it and w is gathered over it, as FSDP itself does before using
    a layer. (Taking the axis for both gave silently wrong losses.)"""
    left = tuple(n for n in axis_names((entry,)) if n not in taken)
    return None if not left else left[0] if len(left) == 1 else left


def manual_if_explicit(*roles):
    """Decorate a loss core `core(*arrays, **static)` (below its `jax.jit`).

    `roles` gives the layout of each positional argument (trailing ones default to
    REPLICATED). Every argument is resharded to the layout of the anchor (the first
    LOGITS or HIDDEN argument, and the TABLE's rows for the classes) — a no-op when the
    caller's layouts agree. The core's outputs must be scalars or positions-shaped.
    """

    def decorate(core):
        @functools.wraps(core)
        def run(*args, **static):
            where = {"logits": LOGITS, "positions": POSITIONS}.get(static.get("where_kind"))
            arg_roles = [where if r == WHERE else r for r in roles]
            arg_roles += [REPLICATED] * (len(args) - len(arg_roles))
            layout = layout_of(args, arg_roles, static.get("axis"))
            if layout is None:  # no explicit axes (inside a shard_map: none left)
                return core(*args, **static)
            names = {k: static.get(k) for k in ("vocab_axis_name", "batch_axis_name")}
            if (
                any(v is not None for v in names.values())
                or jax.sharding.get_abstract_mesh().manual_axes
            ):
                _refuse_partly_manual(names, layout)
            return _shard_mapped(core, args, arg_roles, layout, static)

        return run

    return decorate


def _refuse_partly_manual(names: dict, layout: Layout):
    """Inputs still split over Explicit axes inside a shard_map (axis names given, or
    manual mesh axes): it is manual over some axes only. A nested shard_map over the
    rest runs the forward, but JAX (0.10) fails to lower its gradient, so say what
    works instead."""
    left = sorted(set(axis_names((*layout.positions, layout.classes))))
    given = ", ".join(f"{k}={v!r}" for k, v in names.items() if v is not None)
    raise ValueError(
        f"Called{' with ' + given if given else ''} "
        f"inside a shard_map that leaves the inputs split over the Explicit mesh axes "
        f"{left}. Make the shard_map manual over those axes too (its `axis_names`) and "
        "pass them as `vocab_axis_name` / `batch_axis_name`, or call the loss outside "
        "the shard_map."
    )


def elementwise_layout(arrays, shape) -> list:
    """Arguments of an elementwise loss over `shape`, all with one explicit sharding.

    JAX refuses elementwise operations between differently sharded operands on
    Explicit axes; when any argument is explicitly sharded, each is broadcast to
    `shape` and resharded to the first sharded one's layout (a local slice for a
    replicated argument). Without explicit shardings the arguments pass unchanged.
    """
    if all(a is None or explicit_spec(a) is None for a in arrays):
        return list(arrays)
    full = [None if a is None else jax.numpy.broadcast_to(a, shape) for a in arrays]
    ref = next(a for a in full if a is not None and explicit_spec(a) is not None)
    sharding = jax.typeof(ref).sharding
    return [None if a is None else jax.reshard(a, sharding) for a in full]


def _full(a, shape):
    return a if shape is None or a.shape == shape else jax.numpy.broadcast_to(a, shape)


def _shard_mapped(core, args, roles, layout: Layout, static):
    specs = tuple(
        layout.spec(REPLICATED if a is None else r) for a, r in zip(args, roles, strict=True)
    )
    args = tuple(
        a if a is None else jax.reshard(_full(a, layout.shape(r)), NamedSharding(layout.mesh, s))
        for a, r, s in zip(args, roles, specs, strict=True)
    )
    # Output structure from an unsharded trace: positions-shaped leaves keep the
    # positions' split, scalars are replicated.
    abstract = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    shapes = jax.eval_shape(functools.partial(core, **static), *abstract)
    out_specs = jax.tree.map(lambda s: P(*layout.positions) if s.ndim else P(), shapes)
    body = functools.partial(core, **{**static, **layout.axis_names()})
    return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=out_specs)(*args)
