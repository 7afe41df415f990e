"""The fused-head kernels of `linear_cross_entropy(..., implementation="pallas")`.

The shared suite of tests/linear/test_api.py runs them (in the Pallas interpreter on CPU)
against the materialised "xla" reference for every option and reduction; here: several
steps of the matmul loop over the hidden size, bfloat16, aux, non-finite values, and
lowering for CUDA at the benchmark shape.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxent
from jaxent.pallas import fused_head, interpret_mode

from .. import oracles
from ..kernels import each_platform, kernel_inputs, kernel_mode
from ..linear.grouping import grouped
from .test_lowering import TARGETS, lowered
from .test_lowering import pytestmark as lowering_skip

F32 = jnp.float32
# The tests marked `usefixtures("_platform")` run through both kernels. The GPU's: 3
# ragged row tiles, 3 ragged class tiles per block of 45 (V = 90 in 2 blocks), 3 ragged
# steps over D = 40. The TPU's, in its smallest tiles (32 rows, 128 classes, 128 of
# depth): 2 row tiles, the rest whole (`test_tpu_kernels_*` has ragged class and depth).
TILES = {}
PER_PLATFORM = {
    "gpu": dict(platform="gpu", block_rows=16, block_classes=16, block_depth=16),
    "tpu": dict(platform="tpu", block_rows=32, block_classes=128, block_depth=128),
}
_platform = each_platform(TILES, PER_PLATFORM, autouse=False)


def make(seed, n=37, d=40, v=90, dtype=F32):
    kx, kw, ky, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (n, d), F32).astype(dtype)
    w = (jax.random.normal(kw, (v, d), F32) * 0.4).astype(dtype)
    labels = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    bias = (jax.random.normal(kb, (v,), F32) * 0.1).astype(dtype)
    return x, w, labels, bias


def value_and_grads(impl, x, w, labels, bias, block_size=None, **opts):
    def loss(x, w, bias):
        return jaxent.linear_cross_entropy(
            x, w, labels, bias=bias, implementation=impl, block_size=block_size, **opts
        )

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=opts.get("return_aux", False))(
        x, w, bias
    )


ALL = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, ignore_index=5, return_aux=True)


@pytest.mark.usefixtures("_platform")
@pytest.mark.parametrize("block_size", [45, 90])
def test_depth_steps_and_all_options_match_reference(block_size):
    x, w, labels, bias = make(0)
    labels = labels.at[:3].set(5)  # ignored positions
    opts = dict(ALL, class_weights=jnp.linspace(0.5, 2.0, 90, dtype=F32))
    with kernel_mode(**TILES):
        got = value_and_grads("pallas", x, w, labels, bias, block_size, **opts)
    want = value_and_grads("xla", x, w, labels, bias, **opts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        assert oracles.rel_err(a, b) < 1e-5


@pytest.mark.usefixtures("_platform")
def test_bfloat16_is_as_accurate_as_the_reference():
    """bf16 inputs, float32 accumulation: loss and gradients against a float32 run of
    the reference no worse than the materialised bf16 reference's (x1.5 for rounding
    the gradient to bf16 at another point)."""
    x, w, labels, bias = make(1, dtype=jnp.bfloat16)
    exact = value_and_grads("xla", *(a.astype(F32) for a in (x, w)), labels, bias.astype(F32))
    with kernel_mode(**TILES):
        got = value_and_grads("pallas", x, w, labels, bias, 45)
    ref = value_and_grads("xla", x, w, labels, bias)
    assert got[0].dtype == F32
    assert oracles.rel_err(got[0], exact[0]) < 1e-5
    for g, r, e in zip(got[1], ref[1], exact[1], strict=True):
        assert g.dtype == jnp.bfloat16
        assert oracles.rel_err(g, e) <= 1.5 * oracles.rel_err(r, e) + 1e-3


@pytest.mark.usefixtures("_platform")
def test_argmax_ties_and_nan_rows_as_xla():
    """aux.accuracy: equal logits go to the smaller class id — across tiles and
    segments (70 and 40 share strided block 0, at columns 35 and 20) and across blocks
    (21 sits in block 1, visited after 40 and 70); a NaN hidden state gives NaN, as in
    the reference."""
    x = jnp.ones((4, 16), F32)
    w = jnp.zeros((90, 16), F32).at[jnp.array([70, 21, 40])].set(1.0)
    labels = jnp.array([21, 40, 70, 21])
    x = x.at[3, 0].set(jnp.nan)
    with kernel_mode(**TILES):
        got = jaxent.linear_cross_entropy(
            x, w, labels, implementation="pallas", block_size=45, reduction="none",
            return_aux=True,
        )  # fmt: skip
    want = jaxent.linear_cross_entropy(
        x, w, labels, implementation="xla", reduction="none", return_aux=True
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert np.isnan(got[0][3])
    # Row 0 (label 21) is right; the NaN row's argmax is its first NaN, class 0.
    assert got[1].accuracy == want[1].accuracy == pytest.approx(1 / 4)


@pytest.mark.usefixtures("_platform")
def test_out_of_range_label_is_nan():
    x, w, labels, bias = make(2, n=5)
    labels = labels.at[1].set(90)
    with kernel_mode(**TILES):
        got = jaxent.linear_cross_entropy(
            x, w, labels, bias=bias, implementation="pallas", reduction="none"
        )
    assert np.isnan(got[1]) and np.isfinite(np.delete(np.asarray(got), 1)).all()


@pytest.mark.parametrize("block_size", [152, 304])
def test_tpu_kernels_read_blocks_in_place_and_match_reference(block_size):
    """The TPU kernels with lean's runs of 8 classes (as on a TPU): each block is read
    from the grouped view of w (V = 304 in blocks of 152: 19 runs x 2 blocks x 8; or in
    one block), in class tiles of 128 (then a ragged one), 3 ragged steps over D = 300
    and 2 row tiles over 37; every option, bias, class weights and a logit mask."""
    v = 304
    x, w, labels, bias = make(5, n=37, d=300, v=v)
    labels = labels.at[:3].set(5)
    where = (jax.random.uniform(jax.random.PRNGKey(6), (37, v)) > 0.2) | (
        jax.nn.one_hot(labels, v, dtype=bool)
    )
    opts = dict(ALL, class_weights=jnp.linspace(0.5, 2.0, v, dtype=F32), where=where)
    with kernel_mode(**PER_PLATFORM["tpu"]), grouped(8):
        got = value_and_grads("pallas", x, w, labels, bias, block_size, **opts)
        traced = jax.make_jaxpr(lambda *a: value_and_grads("pallas", *a, block_size, **opts))(
            x, w, labels, bias)  # fmt: skip
    view = (block_size // 8, v // block_size, 8, 300)  # w as lean's strided runs
    for name in ("jaxent_fused_head_stats_tpu", "jaxent_fused_head_grad_tpu"):
        (inputs,) = kernel_inputs(traced, name)
        assert inputs[:3] == [(1,), (37, 300), view]  # block index, x, all of w
    want = value_and_grads("xla", x, w, labels, bias, **opts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        assert oracles.rel_err(a, b) < 1e-5


@pytest.mark.parametrize("mosaic", [False, True])
def test_block_stats_of_no_rows_are_empty(mosaic):
    """N = 0 runs no kernel; the statistics still have the rows' shape (0,)."""
    config = fused_head.Config(None, True, True, True, None, None, mosaic=mosaic)
    ops = fused_head.Operands(
        x=jnp.zeros((0, 16), F32), w=jnp.zeros((32, 16), F32), bias=None, class_weights=None,
        class_mask=jnp.ones((32,), bool), logit_mask=None, labels=jnp.zeros((0,), jnp.int32),
    )  # fmt: skip
    out = fused_head.block_stats(config, ops)
    assert out.first is not None and out.sums.kw_sum is not None
    assert {a.shape for a in jax.tree.leaves(out)} == {(0,)}


def test_tpu_argmax_ties_across_class_tiles_and_nan_rows_as_xla():
    """The TPU kernel's argmax: classes 10 and 200 tie and sit in different 128-class
    tiles of one block (runs of 8, V = 304): the smaller id wins, as in XLA; a NaN
    hidden state gives NaN and its first NaN column."""
    x = jnp.ones((4, 16), F32).at[3, 0].set(jnp.nan)
    w = jnp.zeros((304, 16), F32).at[jnp.array([10, 200])].set(1.0)
    labels = jnp.array([10, 200, 10, 200])
    kw = dict(reduction="none", return_aux=True)
    with kernel_mode(**PER_PLATFORM["tpu"]), grouped(8):
        got = jaxent.linear_cross_entropy(x, w, labels, implementation="pallas", block_size=304,
                                          **kw)  # fmt: skip
    want = jaxent.linear_cross_entropy(x, w, labels, implementation="xla", **kw)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert np.isnan(got[0][3])
    # Rows 0 and 2 (label 10) are right; row 1 (label 200) loses the tie.
    assert got[1].accuracy == want[1].accuracy == pytest.approx(2 / 4)


def test_tile_sizes_have_triton_minimum_and_fit_the_operands():
    config = fused_head.Config(None, False, False, False, None, None)
    assert fused_head.tile_sizes(8192, 2048, 4096, config) == (64, 128, 64)
    assert fused_head.tile_sizes(3, 5, 8, config) == (16, 16, 16)
    assert fused_head.tile_sizes(3, 5, 8, config._replace(block_rows=32)) == (32, 16, 16)


def head_args(n, d, v, dtype, with_weights=False):
    """Shape-only x (N, D), w (V, D), labels (N,) and per-class float32 weights (V,)."""
    shapes = [((n, d), dtype), ((v, d), dtype), ((n,), jnp.int32)]
    shapes += [((v,), jnp.float32)] * with_weights
    return [jax.ShapeDtypeStruct(s, t) for s, t in shapes]


@lowering_skip
@pytest.mark.parametrize(
    ("shape", "dtype", "opts"),
    [
        ((8192, 4096, 128256), jnp.bfloat16, {}),  # the Llama-3 head of the benchmarks
        ((8192, 4096, 128256), jnp.bfloat16, ALL),
        ((37, 40, 90), jnp.float32, ALL),
    ],
)
def test_lowers_for_cuda(monkeypatch, shape, dtype, opts):
    """`jax.export` for CUDA from this CPU host: forward + backward contain one stats
    kernel (the forward loop's body) and one gradient kernel (the backward loop's).
    PTX compilation and speed need a GPU."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the choice as on a GPU
    args = head_args(*shape, dtype)

    def fn(x, w, y):
        loss = functools.partial(jaxent.linear_cross_entropy, implementation="pallas", **opts)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux="return_aux" in opts)(x, w, y)

    text = lowered(fn, "cuda", *args)
    assert text.count("jaxent_fused_head_stats") >= 1
    assert text.count("jaxent_fused_head_grad") >= 1
    assert sum(text.count(t) for t in TARGETS) == 2


@pytest.mark.parametrize(
    ("shape", "dtype", "view"),
    [
        ((8192, 4096, 128256), jnp.bfloat16, "96x167x8x4096xbf16"),  # blocks of 768
        ((37, 300, 304), jnp.float32, "38x1x8x300xf32"),
    ],
)
def test_lowers_for_tpu_reading_w_in_place(monkeypatch, shape, dtype, view):
    """`jax.export` for TPU from this CPU host, every option (x64 on: no 64-bit value
    may reach Mosaic): forward + backward contain the two Mosaic kernels, given w as
    lean's grouped view (runs x blocks x 8 x D: a reshape of w, no copy). Mosaic's own
    compilation needs libtpu (`python -m benchmarks.deviceless --target v5p`)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # the choice as on a TPU
    args = head_args(*shape, dtype, with_weights=True)

    def fn(x, w, y, weights):
        loss = functools.partial(jaxent.linear_cross_entropy, implementation="pallas",
                                 class_weights=weights, **ALL)  # fmt: skip
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, y)

    text = lowered(fn, "tpu", *args)
    assert text.count("tpu_custom_call") == 2
    calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
    assert all(f"tensor<{view}>" in line for line in calls)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (CI simulates 8 CPUs)")
@pytest.mark.parametrize("platform", [pytest.param("cuda", marks=lowering_skip), "tpu"])
def test_lowers_data_parallel_inside_shard_map(monkeypatch, platform):
    """A data-parallel step as users write it: shard_map with its default
    check_vma=True, x and labels split over 4 devices, w and bias replicated, the mean
    over the whole batch (`batch_axis_name`). Both kernels' outputs are typed as
    varying like x, so it lowers (Triton's for CUDA, Mosaic's for TPU)."""
    backend = "gpu" if platform == "cuda" else "tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # the choice as there
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(x, w, y, b):
        def loss(x, w, b):
            return jaxent.linear_cross_entropy(
                x, w, y, bias=b, implementation="pallas", batch_axis_name="batch",
                label_smoothing=0.1,
            )  # fmt: skip

        # dw and db come back summed over the devices (invariant, as out_specs P() needs).
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)

    run = jax.shard_map(body, mesh=mesh, in_specs=(P("batch"), P(), P("batch"), P()),
                        out_specs=(P(), (P("batch"), P(), P())))  # fmt: skip
    text = lowered(run, platform, *head_args(64, 256, 1024, jnp.bfloat16, with_weights=True))
    assert sum(text.count(t) for t in (*TARGETS, "tpu_custom_call")) == 2


def test_forward_segments_fill_the_gpu_and_cover_every_tile():
    """Few blocks of rows: the classes are split into segments (grid rows x segments,
    about TARGET_PROGRAMS programs); many rows: one segment. Every class tile is in
    exactly one segment."""
    llama = (64, 128, 64)
    assert fused_head.segments(8192, 2048, llama) == (2, 8)  # 128 row blocks, 16 tiles
    assert fused_head.segments(512, 2048, llama) == (16, 1)  # 8 row blocks
    assert fused_head.segments(1 << 20, 2048, llama) == (1, 16)
    # (1000, 3000): 94 tiles in segments of 19 — the last one ragged
    for n, v in [(37, 100), (1000, 4000), (5, 33), (1000, 3000)]:
        num, per = fused_head.segments(n, v, (16, 32, 16))
        tiles = -(-v // 32)
        assert (num - 1) * per < tiles <= num * per


def test_segments_of_several_class_tiles_match_float64():
    """Every test elsewhere runs one class tile per segment. Here 15 row blocks of 16
    leave room for 10 segments of 2 tiles over V = 300 (19 tiles, the last segment
    one tile, the last tile ragged): per-row losses against float64 NumPy, and a
    tie between classes 40 and 70 (tiles 2 and 4: segments 1 and 2) goes to 40."""
    n, d, v = 240, 16, 300
    tiles = dict(platform="gpu", block_rows=16, block_classes=16, block_depth=16)
    assert fused_head.segments(n, v, (16, 16, 16)) == (10, 2)
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(kx, (n, d), F32)
    w = (jax.random.normal(kw, (v, d), F32) * 0.5).at[jnp.array([40, 70])].set(1.0)
    labels = jax.random.randint(ky, (n,), 0, v).at[:4].set(40)
    x = x.at[:4].set(1.0)  # rows 0-3: classes 40 and 70 tie at 16; the rest ~N(0, 4)
    with kernel_mode(**tiles):
        got, aux = jaxent.linear_cross_entropy(
            x, w, labels, implementation="pallas", block_size=v, reduction="none",
            return_aux=True,
        )  # fmt: skip
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    want = oracles.cross_entropy(z, labels, reduction="none")[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (np.argmax(z[:4], axis=1) == 40).all()
    right = np.argmax(z, axis=1) == np.asarray(labels)
    assert aux.accuracy == pytest.approx(right.mean())


def test_kernel_mode_is_part_of_the_jit_cache_key():
    """The mode (`interpret_mode`, `tiles`) is read outside jit: other tile sizes trace
    anew (their kernels' grids differ), and a call after leaving the mode does not
    reuse the interpreted trace."""
    x, w, labels, _ = make(4, n=40)

    def call():
        return jaxent.linear_cross_entropy(x, w, labels, implementation="pallas")

    def jaxpr():  # a new function each time: make_jaxpr caches by function, not by mode
        return str(jax.make_jaxpr(lambda: call())())

    with interpret_mode(block_rows=16, block_classes=16):
        small, a = jaxpr(), call()
    with interpret_mode(block_rows=32, block_classes=32, block_depth=32):
        large, b = jaxpr(), call()
    # The forward kernel's grid: (blocks of rows, segments of the 90 classes).
    assert "grid=(3, 6)" in small and "grid=(2, 3)" in large and "grid=(3, 6)" not in large
    np.testing.assert_allclose(b, a, rtol=1e-6)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="backend is 'cpu'"):
            call()
