"""Sharded linear_cross_entropy (SPEC §6, §5) on 8 simulated CPU devices.

x and labels are split over "batch", w, bias and class_weights over "vocab" (labels
are global ids). Every implementation runs inside shard_map and under jax.jit on
NamedSharding inputs, against the materialised "xla" implementation on one device
(see tests/sharded.py; loss, every aux field and the gradients of x, w and bias).
Block sizes leave several blocks per shard and a local vocabulary that is not a
multiple of the vocabulary block ("lean" pads); "chunked" also splits its blocks into
strided sub-blocks (None runs it without), which must stay split over the batch axis.

Compiled programs: no all-gather of w or the logits. Inside shard_map (and with
Explicit mesh axes, which run it) what crosses devices is one all-reduce of dw (and
dbias) over the batch axis, one of dx over the vocabulary axis, and per-position
statistics.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxent
from benchmarks import hlo

from .. import oracles
from ..sharded import Case, assert_same, in_shard_map, mesh, single_device, under_jit
from .grouping import grouped

F32 = jnp.float32
N, D, V = 32, 16, 208  # V: 26 classes per device on 1x8, 52 on 2x4
BLOCKS = {"chunked": (16, 8), "lean": 16, None: 8, "xla": None}  # chunked: sub-blocks
HIDDEN, TABLE, POSITIONS, CLASSES = P("batch", None), P("vocab", None), P("batch"), P("vocab")
FLOATS_PER_POSITION = 16  # per-position statistics per call: max, sums, label logit


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def weights_masked_logits(impl):
    """bias, class weights, smoothing, soft-cap, an in-range ignore_index, logits mask."""
    k = _keys(0, 6)
    labels = jax.random.randint(k[2], (N,), 0, V).at[1].set(3).at[6].set(3).at[9].set(V - 1)
    mask = (jax.random.uniform(k[5], (N, V)) > 0.2).at[0].set(False)
    mask = mask | jax.nn.one_hot(labels, V, dtype=bool)
    arrays = dict(
        x=(jax.random.normal(k[0], (N, D), F32), HIDDEN),
        w=(jax.random.normal(k[1], (V, D), F32) * 0.5, TABLE),
        labels=(labels, POSITIONS),
        bias=(jax.random.normal(k[3], (V,), F32) * 0.1, CLASSES),
        class_weights=(jax.random.uniform(k[4], (V,), F32, 0.2, 2.0), CLASSES),
        where=(mask, P("batch", "vocab")),
    )
    options = dict(label_smoothing=0.1, softcap=5.0, ignore_index=3, return_aux=True)
    return _case(arrays, options, impl, ("none", "mean"))


def array_options_masked_positions(impl):
    """Smoothing and z-loss as arrays (differentiated too), a positions mask,
    ignore_index=-100."""
    k = _keys(1, 4)
    labels = jax.random.randint(k[2], (N,), 0, V).at[2].set(-100).at[7].set(-100)
    arrays = dict(
        x=(jax.random.normal(k[0], (N, D), F32), HIDDEN),
        w=(jax.random.normal(k[1], (V, D), F32) * 0.5, TABLE),
        labels=(labels, POSITIONS),
        where=(jax.random.uniform(k[3], (N,)) > 0.25, POSITIONS),
        label_smoothing=(jnp.float32(0.2), P()),
        z_loss=(jnp.float32(1e-3), P()),
    )
    return _case(arrays, dict(ignore_index=-100, return_aux=True), impl, ("sum", "mean"))


def _case(arrays, options, impl, reductions):
    """Reduction "none" takes its own gradient path ("chunked": recompute in the backward),
    "sum" and "mean" another: each option set runs two reductions, the two sets all three."""
    options = dict(options, implementation=impl, block_size=BLOCKS[impl])
    wrt = tuple(k for k in ("x", "w", "bias", "label_smoothing", "z_loss") if k in arrays)
    return Case(jaxent.linear_cross_entropy, arrays, options, wrt, POSITIONS, reductions)


OPTION_SETS = {f.__name__: f for f in (weights_masked_logits, array_options_masked_positions)}
_ORACLES = {}


def oracle(name):
    """The single-device "xla" result, computed once per option set."""
    if name not in _ORACLES:
        _ORACLES[name] = single_device(OPTION_SETS[name]("xla"))
    return _ORACLES[name]


def assert_nothing_gathered(found, vocab_shards):
    """No all-gather of w, a shard of w, or logits; at most XLA's partitioning of the
    argmax behind aux.accuracy gathers one int64 candidate per position and shard."""
    allowed = N * vocab_shards * 8
    assert allowed * 4 < min(V * D * 4, N * V * 4)  # so the bound means something
    assert hlo.largest(found, "all-gather") <= allowed, found


def assert_one_sum_per_step(found, mesh_shape, calls):
    """Per call (one per reduction): dw and dbias summed once over the batch axis, dx once
    over the vocabulary axis, plus per-position statistics — never a copy of w or of the
    logits, never a sum repeated per block (XLA's partitioning with Auto axes repeats it,
    2 to 4 times over at these shapes)."""
    batch, vocab = mesh_shape
    per_call = FLOATS_PER_POSITION * 4 * N + (N // batch) * D * 4
    if batch > 1:
        per_call += (V // vocab) * (D + 1) * 4
    assert hlo.total_bytes(found) <= calls * per_call, found
    assert hlo.largest(found, "all-gather") == 0, found


# Both option sets on the 2x4 mesh for "chunked" and "lean"; the logits-mask set on the
# vocabulary-parallel 1x8 too; "xla" once. Under jit below: None (which is "chunked" on
# CPU), and the data-parallel 8x1. Compile time keeps it to this.
A, B = "weights_masked_logits", "array_options_masked_positions"
SHARD_MAP_RUNS = [(name, impl, (2, 4)) for impl in ("chunked", "lean") for name in (A, B)]
SHARD_MAP_RUNS += [(A, impl, (1, 8)) for impl in ("chunked", "lean")]
SHARD_MAP_RUNS += [(B, "xla", (2, 4))]


@pytest.mark.parametrize(("name", "impl", "mesh_shape"), SHARD_MAP_RUNS, ids=str)
def test_shard_map_equals_single_device(name, impl, mesh_shape):
    case = OPTION_SETS[name](impl)
    got, found = in_shard_map(case, mesh_shape, oracle(name))
    assert_same(got, oracle(name))
    assert_one_sum_per_step(found, mesh_shape, len(case.reductions))


JIT_RUNS = [(A, impl, (2, 4), False) for impl in ("lean", None, "xla")]
JIT_RUNS += [(A, "lean", (1, 8), False), (B, "chunked", (8, 1), False)]
JIT_RUNS += [(B, "chunked", (2, 4), True)]  # Explicit: any implementation, under shard_map


@pytest.mark.parametrize(("name", "impl", "mesh_shape", "explicit"), JIT_RUNS, ids=str)
def test_jit_on_named_sharding_equals_single_device(name, impl, mesh_shape, explicit):
    """Auto axes: XLA partitions the block loops itself — no gathers, but it sums the
    loop-carried dw (data parallel, "chunked") or dx (vocabulary parallel, "lean")
    once per block. Explicit axes: the call runs under shard_map, one sum per step."""
    case = OPTION_SETS[name](impl)
    got, found = under_jit(case, mesh_shape, explicit, oracle(name))
    assert_same(got, oracle(name))
    assert_nothing_gathered(found, mesh_shape[1])
    if explicit:
        assert_one_sum_per_step(found, mesh_shape, len(case.reductions))


def test_grouped_lean_under_jit_on_named_sharding():
    """Grouped "lean", runs of 4 classes (a TPU's blocks): `w` (208 rows, 4 devices on the
    vocabulary axis) is viewed as 4 runs x 13 blocks x 4, split by run — still nothing
    gathered, and the single-device result."""
    with grouped(4):
        case = OPTION_SETS[A]("lean")
        got, found = under_jit(case, (2, 4), False, oracle(A))
    assert_same(got, oracle(A))
    assert_nothing_gathered(found, 4)


def test_lean_blocks_are_split_like_w_under_jit():
    """Asked for blocks of 26 classes (26 runs, over 4 vocabulary shards: XLA would gather
    all of `w` to form the strided view), "lean" takes 16, whose runs the shards split
    (`api.dividing_block`): nothing gathered, the single-device result."""
    case = OPTION_SETS[A]("lean")
    case = case._replace(options=dict(case.options, block_size=26))
    got, found = under_jit(case, (2, 4), False, oracle(A))
    assert_same(got, oracle(A))
    assert_nothing_gathered(found, 4)


@pytest.mark.parametrize("impl", ["chunked", "lean"])
def test_vocabulary_split_over_both_mesh_axes(impl):
    """`vocab_axis_name` may be a tuple (w's rows split over the whole 2x4 mesh): the
    gradient of x is summed over both axes once (it was counted 8 times), inside
    shard_map and under jit on Explicit axes (which passes the tuple itself)."""
    k = _keys(2, 3)
    x = jax.random.normal(k[0], (N, D), F32)
    w = jax.random.normal(k[1], (V, D), F32) * 0.5
    labels = jax.random.randint(k[2], (N,), 0, V)
    both = ("batch", "vocab")
    options = dict(implementation=impl, block_size=BLOCKS[impl])

    def grads(loss):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w, labels)

    want = grads(lambda x, w, y: jaxent.linear_cross_entropy(x, w, y, implementation="xla"))
    inside = jax.shard_map(
        lambda x, w, y: jaxent.linear_cross_entropy(x, w, y, vocab_axis_name=both, **options),
        mesh=mesh((2, 4)),
        in_specs=(P(), P(both, None), P()),
        out_specs=P(),
    )
    assert_same(grads(inside), want)

    m = mesh((2, 4), explicit=True)
    put = [jax.device_put(a, NamedSharding(m, s)) for a, s in ((x, P()), (w, P(both, None)))]
    got = jax.jit(jax.value_and_grad(
        lambda x, w: jaxent.linear_cross_entropy(x, w, labels, **options), argnums=(0, 1)
    ))(*put)  # fmt: skip
    assert_same(got, want)


FSDP_LAYOUTS = {
    "w over the batch axis": ((8, 1), P("batch", None)),
    "w over both axes": ((2, 4), P(("batch", "vocab"), None)),
}


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
@pytest.mark.parametrize("impl", ["xla", None, "lean"])
def test_jit_with_w_split_over_the_positions_axis(layout, impl):
    """FSDP / ZeRO-3 layout on Explicit axes: w's rows split over the mesh axis that also
    splits the positions. That axis stays with the positions and w is gathered over it
    (one axis cannot split both; taking it for both gave silently wrong losses)."""
    mesh_shape, w_spec = FSDP_LAYOUTS[layout]
    k = _keys(3, 3)
    x = jax.random.normal(k[0], (N, D), F32)
    w = jax.random.normal(k[1], (V, D), F32) * 0.5
    labels = jax.random.randint(k[2], (N,), 0, V)

    def value_and_grads(x, w, y, implementation):
        loss = functools.partial(jaxent.linear_cross_entropy, implementation=implementation)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w, y)

    want = value_and_grads(x, w, labels, "xla")
    m = mesh(mesh_shape, explicit=True)
    put = [
        jax.device_put(a, NamedSharding(m, s))
        for a, s in ((x, HIDDEN), (w, w_spec), (labels, POSITIONS))
    ]
    assert_same(value_and_grads(*put, impl), want)


def test_untracked_vocabulary_split_falls_back_to_xla():
    """With `check_vma=False` (as in `pmap`) the types do not say w varies over "vocab",
    and the hand-written backwards would sum dx over it twice (8x too large): "chunked"
    and "lean" raise NotImplementedError there, and None falls back to "xla"
    (autodiff), which stays right."""
    k = _keys(4, 3)
    x = jax.random.normal(k[0], (N, D), F32)
    w = jax.random.normal(k[1], (V, D), F32) * 0.5
    labels = jax.random.randint(k[2], (N,), 0, V)

    def untracked(implementation):
        return jax.shard_map(
            lambda x, w: jaxent.linear_cross_entropy(
                x, w, labels, implementation=implementation, vocab_axis_name="vocab"
            ),
            mesh=mesh((1, 8)),
            in_specs=(P(), TABLE),
            out_specs=P(),
            check_vma=False,
        )

    for impl in ("chunked", "lean"):
        with pytest.raises(NotImplementedError, match=rf"'{impl}' with `vocab_axis_name='vocab'"):
            jax.grad(untracked(impl))(x, w)
    want = jax.grad(lambda x: jaxent.linear_cross_entropy(x, w, labels, implementation="xla"))(x)
    got = jax.jit(jax.grad(untracked(None)))(x, w)
    assert oracles.rel_err(got, want) < 1e-5


def test_explicit_axes_with_replicated_x_and_w_equal_single_device():
    """Replicated x and w with labels split over "batch" on Explicit axes: the positions'
    split comes from the labels and the loss reshards x to it (JAX refused the mixed
    layouts inside the loss with a sharding type error)."""
    case = weights_masked_logits(None)
    specs = dict(x=P(), w=P(), bias=P(), class_weights=P(), where=P())
    arrays = {k: (v, specs.get(k, s)) for k, (v, s) in case.arrays.items()}
    got, _ = under_jit(case._replace(arrays=arrays), (2, 4), True, oracle(A))
    assert_same(got, oracle(A))


@pytest.mark.parametrize("impl", [None, "lean"])
def test_the_classes_follow_w_when_the_bias_is_split_another_way(impl):
    """Explicit axes, w's rows over "vocab" but the bias over "batch" (the positions'
    axis): the classes take w's split, so w is never gathered (the bias, 208 floats,
    may be); the result is the single-device one."""
    k = _keys(5, 4)
    x = jax.random.normal(k[0], (N, D), F32)
    w = jax.random.normal(k[1], (V, D), F32) * 0.5
    labels = jax.random.randint(k[2], (N,), 0, V)
    bias = jax.random.normal(k[3], (V,), F32) * 0.1

    def value_and_grads(implementation):
        def loss(x, w, y, b):
            return jaxent.linear_cross_entropy(x, w, y, bias=b, implementation=implementation)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))

    want = value_and_grads("xla")(x, w, labels, bias)
    m = mesh((2, 4), explicit=True)
    arrays = ((x, HIDDEN), (w, TABLE), (labels, POSITIONS), (bias, P("batch")))
    put = [jax.device_put(a, NamedSharding(m, s)) for a, s in arrays]
    f = value_and_grads(impl)
    assert_same(f(*put), want)
    found = hlo.collectives(f.lower(*put).compile().as_text())
    assert_nothing_gathered(found, vocab_shards=4)
