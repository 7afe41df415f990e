"""Sharded logits losses (SPEC §6) on 8 simulated CPU devices, meshes 8x1, 1x8, 2x4.

Each case computes its reductions (all three, or two for the slow-to-compile softmax
cases, which share one reduction code path) and every aux field at once, and its
gradients; the oracle is the same loss on one device with the whole batch (see
tests/sharded.py). Together the cases cover every option: class weights, pos_weight
and weights split with the classes, labels as global ids (`ignore_index` inside the
class range too), smoothing over the global class count, z-loss, soft-cap, `where`
in both shapes (a row with one logit left, so most shards hold none of it), scalar
options as arrays, the class axis first, temperature and -inf teacher logits.

The compiled programs are also inspected: no all-gather (but for XLA's own argmax
candidates under Auto axes, see `assert_o_of_n`), and the bytes that cross devices
(per device, per step) are a few dozen floats per position — O(N), while one copy of
the logits is N * C * 4 bytes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxent
from benchmarks import hlo

from .sharded import (
    AXIS_NAMES,
    MESHES,
    Case,
    assert_same,
    in_shard_map,
    mesh,
    single_device,
    under_jit,
)

F32 = jnp.float32
N, C = 16, 2048
LOGITS, POSITIONS, CLASSES = P("batch", "vocab"), P("batch"), P("vocab")
FLOATS_PER_POSITION = 48  # bound on the per-position statistics that cross devices
ARGMAX_BYTES = 2 * 3 * (4 + 8)  # per position and vocabulary shard, see assert_o_of_n


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _labels(key):
    labels = jax.random.randint(key, (N,), 0, C)
    return labels.at[1].set(3).at[5].set(3).at[9].set(C - 1)


def _logits_mask(key, labels):
    """Drops ~20% of the logits but never a label's; row 0 keeps its label's logit only."""
    onehot = jax.nn.one_hot(labels, C, dtype=bool)
    return (jax.random.uniform(key, (N, C)) > 0.2).at[0].set(False) | onehot


def cross_entropy_weighted_masked_logits():
    k = _keys(0, 4)
    labels = _labels(k[1])
    return Case(
        jaxent.cross_entropy,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 2, LOGITS),
            labels=(labels, POSITIONS),
            class_weights=(jax.random.uniform(k[2], (C,), F32, 0.2, 2.0), CLASSES),
            where=(_logits_mask(k[3], labels), LOGITS),
        ),
        dict(label_smoothing=0.1, softcap=5.0, ignore_index=3, return_aux=True),
        ("logits",),
        POSITIONS,
        ("none", "mean"),
    )


def cross_entropy_array_options_masked_positions():
    k = _keys(1, 3)
    labels = _labels(k[1]).at[2].set(-100).at[7].set(-100)
    return Case(
        jaxent.cross_entropy,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 3, LOGITS),
            labels=(labels, POSITIONS),
            where=(jax.random.uniform(k[2], (N,)) > 0.25, POSITIONS),
            label_smoothing=(jnp.float32(0.2), P()),
            z_loss=(jnp.float32(1e-3), P()),
        ),
        dict(ignore_index=-100, return_aux=True),
        ("logits",),
        POSITIONS,
        ("sum", "mean"),
    )


def cross_entropy_class_axis_first():
    k = _keys(2, 2)
    return Case(
        jaxent.cross_entropy,
        dict(
            logits=(jax.random.normal(k[0], (C, N), F32), P("vocab", "batch")),
            labels=(_labels(k[1]), POSITIONS),
        ),
        dict(axis=0, z_loss=1e-2, return_aux=True),
        ("logits",),
        POSITIONS,
    )


def soft_cross_entropy_all_options():
    k = _keys(3, 4)
    mask = _logits_mask(k[3], _labels(k[1]))
    targets = jax.nn.softmax(jax.random.normal(k[1], (N, C), F32) * 3, where=mask)
    return Case(
        jaxent.soft_cross_entropy,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 2, LOGITS),
            targets=(jnp.where(mask, targets, 0), LOGITS),
            class_weights=(jax.random.uniform(k[2], (C,), F32, 0.2, 2.0), CLASSES),
            where=(mask, LOGITS),
        ),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, return_aux=True),
        ("logits", "targets"),
        POSITIONS,
        ("none", "mean"),
    )


def binary_cross_entropy_all_options():
    k = _keys(4, 5)
    return Case(
        jaxent.binary_cross_entropy,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 3, LOGITS),
            targets=(jax.random.uniform(k[1], (N, C), F32), LOGITS),
            pos_weight=(jax.random.uniform(k[2], (C,), F32, 0.5, 3.0), CLASSES),
            weights=(jax.random.uniform(k[3], (N, C), F32, 0.5, 1.5), LOGITS),
            where=(jax.random.uniform(k[4], (N, C)) > 0.3, LOGITS),
        ),
        dict(label_smoothing=0.1),
        ("logits", "targets"),
        LOGITS,
    )


def focal_loss_masked():
    k = _keys(5, 3)
    return Case(
        jaxent.focal_loss,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 3, LOGITS),
            targets=(jax.random.bernoulli(k[1], 0.3, (N, C)).astype(F32), LOGITS),
            where=(jax.random.uniform(k[2], (N, C)) > 0.3, LOGITS),
        ),
        dict(alpha=0.25, gamma=1.5),
        ("logits",),
        LOGITS,
    )


def kl_divergence_temperature_masked():
    k = _keys(6, 3)
    teacher = jax.random.normal(k[1], (N, C), F32) * 2
    teacher = jnp.where(jax.random.uniform(k[2], (N, C)) > 0.1, teacher, -jnp.inf)
    return Case(
        jaxent.kl_divergence,
        dict(
            logits=(jax.random.normal(k[0], (N, C), F32) * 2, LOGITS),
            target_logits=(teacher, LOGITS),
            where=(jnp.arange(N) % 5 != 2, POSITIONS),
        ),
        dict(temperature=2.0),
        ("logits", "target_logits"),
        POSITIONS,
    )


CASES = {
    f.__name__: f
    for f in (
        cross_entropy_weighted_masked_logits,
        cross_entropy_array_options_masked_positions,
        cross_entropy_class_axis_first,
        soft_cross_entropy_all_options,
        binary_cross_entropy_all_options,
        focal_loss_masked,
        kl_divergence_temperature_masked,
    )
}
_ORACLES = {}


def oracle(name):
    if name not in _ORACLES:
        case = CASES[name]()
        _ORACLES[name] = case, single_device(case)
    return _ORACLES[name]


def assert_o_of_n(found, vocab_shards=None):
    """What crosses devices is O(N), far below one copy of the logits, and nothing is
    all-gathered. Exception: XLA's own partitioning (Auto axes) of the argmax behind
    aux.accuracy all-gathers each vocabulary shard's candidate (value, int64 index)
    per position, a few times: O(N x shards), still independent of C."""
    per_position = FLOATS_PER_POSITION * 4
    if vocab_shards is not None:
        per_position += ARGMAX_BYTES * vocab_shards
    assert hlo.largest(found, "all-gather") <= (0 if vocab_shards is None else N * 8 * 8), found
    moved = hlo.total_bytes(found)
    assert moved <= per_position * N, found
    assert moved * 10 < N * C * 4


# Every case on the 2x4 mesh; the degenerate 8x1 and 1x8 meshes for the richest
# cross_entropy case and for kl_divergence (compile time keeps the rest to 2x4).
ALL_MESHES = ("cross_entropy_weighted_masked_logits", "kl_divergence_temperature_masked")
SHARD_MAP_RUNS = [
    (name, shape)
    for name in sorted(CASES)
    for shape in (MESHES if name in ALL_MESHES else [(2, 4)])
]


@pytest.mark.parametrize(("name", "mesh_shape"), SHARD_MAP_RUNS, ids=str)
def test_shard_map_equals_single_device(name, mesh_shape):
    case, want = oracle(name)
    got, found = in_shard_map(case, mesh_shape, want)
    assert_same(got, want)
    assert_o_of_n(found)


# cross_entropy_array_options_masked_positions adds nothing here that the others lack.
JIT_RUNS = [
    (name, (2, 4), explicit)
    for name in sorted(CASES)
    if name != "cross_entropy_array_options_masked_positions"
    for explicit in (False, True)
]
JIT_RUNS += [("cross_entropy_weighted_masked_logits", (1, 8), False)]


@pytest.mark.parametrize(("name", "mesh_shape", "explicit"), JIT_RUNS, ids=str)
def test_jit_on_named_sharding_equals_single_device(name, mesh_shape, explicit):
    """Auto axes: XLA partitions the loss. Explicit axes (`jax.make_mesh`'s default):
    JAX needs every sharding resolved; the softmax losses and kl_divergence then run
    themselves under shard_map, the elementwise ones partition as they are."""
    case, want = oracle(name)
    got, found = under_jit(case, mesh_shape, explicit, want)
    assert_same(got, want)
    assert_o_of_n(found, vocab_shards=None if explicit else mesh_shape[1])


def with_specs(case: Case, **specs) -> Case:
    """The case with some arrays laid out differently (same values)."""
    arrays = {k: (v, specs.get(k, spec)) for k, (v, spec) in case.arrays.items()}
    return case._replace(arrays=arrays)


# Arguments laid out unlike the logits: replicated logits with sharded labels (the
# positions' split then comes from the labels), replicated masks, weights, teachers.
MIXED_LAYOUTS = {
    "cross_entropy_weighted_masked_logits": dict(logits=P(), class_weights=P(), where=P()),
    "binary_cross_entropy_all_options": dict(where=P(), pos_weight=P(), targets=P()),
    "focal_loss_masked": dict(where=P()),
    "kl_divergence_temperature_masked": dict(target_logits=P(), where=P()),
}


@pytest.mark.parametrize("name", sorted(MIXED_LAYOUTS))
def test_explicit_axes_with_mixed_layouts_equal_single_device(name):
    """Explicit axes refuse operations between differently sharded operands; the losses
    reshard their arguments to one layout and give the single-device result. (What
    crosses devices is not bounded here: a replicated argument's gradient is itself
    replicated, gathered from the shards.)"""
    case, want = oracle(name)
    got, _ = under_jit(with_specs(case, **MIXED_LAYOUTS[name]), (2, 4), True, want)
    assert_same(got, want)


@pytest.mark.parametrize("name", ["binary_cross_entropy_all_options", "focal_loss_masked"])
def test_explicit_axes_without_where(name):
    """Without `where` the elementwise losses build their own validity mask; it must
    carry the logits' sharding (a replicated one is refused on Explicit axes)."""
    case = CASES[name]()
    arrays = {k: v for k, v in case.arrays.items() if k != "where"}
    case = case._replace(arrays=arrays)
    got, _ = under_jit(case, (2, 4), True, single_device(case))
    assert_same(got, single_device(case))


@pytest.mark.parametrize("names", [{"batch_axis_name": "batch"}, {}])
def test_shard_map_manual_over_some_axes_only_says_what_works(names):
    """Inside a shard_map manual over "batch" only, logits still split over the Explicit
    "vocab" axis: a ValueError that says how to call it (was an opaque sharding error
    with an axis name; without one the forward ran and its gradient failed to lower)."""
    m = mesh((2, 4), explicit=True)
    logits = jax.device_put(jnp.zeros((N, C), F32), jax.NamedSharding(m, LOGITS))
    labels = jax.device_put(jnp.zeros((N,), jnp.int32), jax.NamedSharding(m, POSITIONS))
    partly = jax.shard_map(
        lambda z, y: jax.lax.pmean(jaxent.cross_entropy(z, y, **names), "batch"),
        mesh=m,
        in_specs=(POSITIONS, POSITIONS),
        out_specs=P(),
        axis_names={"batch"},
    )
    with (
        jax.set_mesh(m),
        pytest.raises(ValueError, match=r"Explicit mesh axes \['vocab'\]\. Make the shard_map"),
    ):
        jax.jit(partly)(logits, labels)


def _dropped_nan_rows(loss):
    """(loss of (array, *rest), the differentiated array, rest, specs of both): rows 0
    (one NaN) and 3 (+inf) dropped by ignore_index or, for soft targets, by `where`."""
    k = _keys(7, 3)
    n, c, d = 8, 16, 4
    labels = jax.random.randint(k[1], (n,), 0, c).at[0].set(-100).at[3].set(-100)
    poison = lambda a: a.at[0, 1].set(jnp.nan).at[3].set(jnp.inf)  # noqa: E731
    if loss == "soft":
        targets = jax.nn.softmax(jax.random.normal(k[2], (n, c), F32))

        def f(z, targets, keep, **names):
            return jaxent.soft_cross_entropy(z, targets, where=keep, **names)

        rest, specs = (targets, labels != -100), (LOGITS, LOGITS, POSITIONS)
        return f, poison(jax.random.normal(k[0], (n, c), F32)), rest, specs
    if loss == "cross_entropy":
        f = functools.partial(jaxent.cross_entropy, ignore_index=-100)
        return f, poison(jax.random.normal(k[0], (n, c), F32)), (labels,), (LOGITS, POSITIONS)
    x = poison(jax.random.normal(k[0], (n, d), F32))
    w = jax.random.normal(k[2], (c, d), F32)
    f = functools.partial(jaxent.linear_cross_entropy, ignore_index=-100, implementation=loss)
    return f, x, (w, labels), (P("batch", None), P("vocab", None), POSITIONS)


@pytest.mark.parametrize("loss", ["cross_entropy", "soft", "xla", "chunked", "lean"])
def test_dropped_rows_holding_nan_or_inf_get_zero_gradient_on_a_vocabulary_split(loss):
    """As on one device (README: a dropped position has exactly zero gradient even
    where it holds NaN or inf): the exchange of statistics between vocabulary shards
    must not carry 0 · exp(NaN) into a dropped row's gradient. ("xla", "chunked",
    "lean": linear_cross_entropy with NaN and inf rows of x.)"""
    f, a, rest, specs = _dropped_nan_rows(loss)
    sharded = jax.shard_map(
        lambda *args: f(*args, **AXIS_NAMES), mesh=mesh((2, 4)), in_specs=specs, out_specs=P()
    )
    want = jax.grad(lambda a: f(a, *rest))(a)
    got = jax.grad(lambda a: sharded(a, *rest))(a)
    dropped = jnp.array([0, 3])
    assert (want[dropped] == 0).all() and (got[dropped] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_xla_partitions_reads_auto_axes_off_the_types_and_the_context_mesh():
    """Where XLA's partitioner splits a loss (Auto axes of more than one device, from the
    array's type or a `jax.set_mesh` context) the default takes no Pallas kernel; one
    device, Explicit axes and shard_map's Manual axes keep it."""
    from jax.sharding import AxisType, NamedSharding

    from jaxent._sharding import xla_partitions

    x = jnp.ones((8, 16), F32)
    auto = mesh((2, 4))

    def seen(a):  # inside jit, from the traced type
        found = []
        jax.jit(lambda a: found.append(xla_partitions(a)) or a.sum())(a)
        return found[0]

    def placed(m, spec):
        return jax.device_put(x, NamedSharding(m, spec))

    assert not xla_partitions(x) and not seen(x)
    assert xla_partitions(placed(auto, LOGITS)) and seen(placed(auto, LOGITS))
    assert seen(placed(auto, P()))  # replicated on the mesh: XLA still partitions
    one = jax.make_mesh((1, 1), ("batch", "vocab"), axis_types=(AxisType.Auto,) * 2)
    assert not seen(placed(one, LOGITS))
    assert not seen(placed(mesh((2, 4), explicit=True), LOGITS))
    with jax.set_mesh(auto):
        assert seen(x)

    def manual(*names):
        found = []

        def body(a):
            found.append(xla_partitions(a))
            return a

        spec = P(*names)
        run = jax.shard_map(body, mesh=auto, in_specs=spec, out_specs=spec, axis_names=set(names))
        jax.jit(run)(placed(auto, LOGITS))
        return found[0]

    assert not manual("batch", "vocab")
    assert manual("batch")  # "vocab" stays Auto, over 4 devices


@pytest.mark.parametrize("loss", ["cross_entropy", "soft", "xla", "chunked", "lean"])
def test_argmax_ties_across_vocabulary_shards_go_to_the_smaller_class_id(loss):
    """Classes 1 and 5 tie for every row's max and sit on different vocabulary shards
    (2 classes per shard on the 2x4 mesh): aux.accuracy counts the smaller id, as
    NumPy's argmax on one device — labels on class 1 are right, on class 5 wrong."""
    x = jnp.zeros((2, 4), F32).at[:, 0].set(1.0)
    w = jnp.zeros((8, 4), F32).at[1, 0].set(2.0).at[5, 0].set(2.0)
    first = np.argmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, axis=-1)
    assert (first == 1).all()
    if loss in ("cross_entropy", "soft"):
        f = jaxent.cross_entropy if loss == "cross_entropy" else jaxent.soft_cross_entropy
        arrays, specs = (x @ w.T,), (P("batch", "vocab"),)
    else:
        f = functools.partial(jaxent.linear_cross_entropy, implementation=loss)
        arrays, specs = (x, w), (P("batch", None), P("vocab", None))
    for label, want in ((1, 1.0), (5, 0.0)):
        target = jnp.full((2,), label)
        if loss == "soft":
            target = jax.nn.one_hot(target, 8, dtype=F32)
        target_spec = P("batch", "vocab") if loss == "soft" else P("batch")
        sharded = jax.shard_map(
            lambda *a: f(*a, return_aux=True, **AXIS_NAMES)[1].accuracy,
            mesh=mesh((2, 4)), in_specs=(*specs, target_spec), out_specs=P(),
        )  # fmt: skip
        assert jax.jit(sharded)(*arrays, target) == want, label
