"""The kernel lowers for CUDA without a GPU, and the automatic choice takes it there.

`jax.export` lowers for a platform other than the host's; lowering allocates nothing,
so the realistic shape (N=8192, V=128256, bfloat16) costs no memory. The Triton custom
call's compatibility check is disabled as its docs describe (it is not a stable
custom call); we only need to see that it is there. What lowering cannot show — PTX
compilation, speed — needs a GPU (benchmarks/pallas.py).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

import jaxent

# The Triton kernel's custom call: jaxlib <= 0.10.2 emits the first, newer jaxlibs compile
# the PTX while lowering (which needs a GPU, or fails on a CPU-only host) and emit the
# second.
TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
_COMPILES_WHILE_LOWERING = tuple(map(int, jax.lib.__version__.split(".")[:3])) > (0, 10, 2)
pytestmark = pytest.mark.skipif(
    _COMPILES_WHILE_LOWERING and jax.default_backend() != "gpu",
    reason="this jaxlib compiles Triton kernels while lowering: exporting for CUDA needs a GPU",
)


def lowered(fn, platform, *args) -> str:
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in TARGETS]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def kernel_calls(text: str) -> int:
    return sum(text.count(t) for t in TARGETS)


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def loss_and_grad(x, y, **kw):
    loss = lambda x: jaxent.cross_entropy(x, y, **kw)  # noqa: E731
    return jax.value_and_grad(loss, has_aux=kw.get("return_aux", False))(x)


ALL = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, ignore_index=-100, return_aux=True)


@pytest.mark.parametrize(
    "shape,dtype,options",
    [
        ((8192, 128256), jnp.bfloat16, {}),  # the benchmark shape of the GPU issue
        ((8192, 128256), jnp.bfloat16, ALL),
        ((1, 1), jnp.float16, {}),
        ((7, 37), jnp.float32, ALL),
        ((3, 5, 1000), jnp.bfloat16, {"where": True, "weights": True, "label_smoothing": 0.2}),
    ],
)
def test_default_choice_lowers_to_the_triton_kernel_for_cuda(shape, dtype, options):
    opts = dict(options)
    if opts.pop("where", False):
        opts["where"] = jnp.ones(shape, bool)
    if opts.pop("weights", False):
        opts["class_weights"] = jnp.ones(shape[-1], jnp.float32)
    fn = functools.partial(loss_and_grad, **opts)
    text = lowered(fn, "cuda", spec(shape, dtype), spec(shape[:-1], jnp.int32))
    # One kernel, in the forward; the backward is the one fused XLA pass.
    assert kernel_calls(text) == 1


SOFT_ALL = {k: v for k, v in ALL.items() if k != "ignore_index"}


@pytest.mark.parametrize("shape,options", [((8192, 128256), {}), ((5, 37), SOFT_ALL)])
def test_soft_default_lowers_to_the_triton_kernel_for_cuda(shape, options):
    def fn(x, t):
        loss = lambda x, t: jaxent.soft_cross_entropy(x, t, **options)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux="return_aux" in options)(x, t)

    text = lowered(fn, "cuda", spec(shape, jnp.bfloat16), spec(shape, jnp.bfloat16))
    assert kernel_calls(text) == 1


def test_xla_choice_and_float64_lower_without_the_kernel():
    args = (spec((64, 1000), jnp.bfloat16), spec((64,), jnp.int32))
    xla = functools.partial(loss_and_grad, implementation="xla")
    assert kernel_calls(lowered(xla, "cuda", *args)) == 0
    args64 = (spec((64, 1000), jnp.float64), spec((64,), jnp.int32))
    assert kernel_calls(lowered(loss_and_grad, "cuda", *args64)) == 0


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (CI simulates 8 CPUs)")
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_vocab_sharded_kernel_lowers_inside_shard_map(monkeypatch, platform):
    """Compiled kernels run under shard_map's default check_vma=True: each output is
    typed as varying like the logits (Triton's for CUDA, with the default choice;
    Mosaic's for TPU, with "pallas")."""
    mesh = jax.make_mesh((4,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    implementation = None
    if platform == "tpu":
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
        implementation = "pallas"

    def body(x, y):
        return jaxent.cross_entropy(
            x, y, vocab_axis_name="v", label_smoothing=0.1, implementation=implementation
        )

    run = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "v"), P()), out_specs=P())
    fn = jax.value_and_grad(run)
    text = lowered(fn, platform, spec((64, 1024), jnp.bfloat16), spec((64,), jnp.int32))
    assert kernel_calls(text) + text.count("tpu_custom_call") == 1


def test_tpu_takes_the_xla_path():
    """The default choice gives TPU an XLA path (the one-read reduction,
    test_one_read.py), with no Pallas call in its module (its Mosaic kernel is opt-in
    until timed on a TPU: `jaxent.pallas`)."""
    x = spec((64, 1000), jnp.bfloat16)
    text = lowered(loss_and_grad, "tpu", x, spec((64,), jnp.int32))
    assert kernel_calls(text) == 0 and "tpu_custom_call" not in text
    soft = lowered(lambda x, t: jaxent.soft_cross_entropy(x, t), "tpu", x, x)
    assert kernel_calls(soft) == 0 and "tpu_custom_call" not in soft


@pytest.mark.parametrize(
    "shape,dtype,options",
    [
        ((8192, 128256), jnp.bfloat16, ALL),  # the benchmark shape of the GPU issue
        ((7, 37), jnp.float32, {"where": True, "weights": True, "label_smoothing": 0.2}),
    ],
)
def test_pallas_on_tpu_lowers_to_the_mosaic_kernel(monkeypatch, shape, dtype, options):
    """implementation="pallas" as on a TPU: the forward is one Mosaic kernel (Pallas'
    TPU lowering runs here, with x64 on: no 64-bit value may reach it). Mosaic's own
    compilation needs libtpu (`python -m benchmarks.deviceless --target v5p`)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # the choice as on a TPU
    options = dict(options)
    x, y = spec(shape, dtype), spec(shape[:-1], jnp.int32)
    extra = []
    if options.pop("where", False):
        extra.append(spec(shape, jnp.bool_))
    if options.pop("weights", False):
        extra.append(spec(shape[-1:], jnp.float32))

    def fn(x, y, *extra):
        where, weights = (extra + (None, None))[:2]
        kw = dict(options, where=where, class_weights=weights, implementation="pallas")
        return loss_and_grad(x, y, **kw)

    text = lowered(fn, "tpu", x, y, *extra)
    assert text.count("tpu_custom_call") == 1 and kernel_calls(text) == 0

    def soft(x, t):
        return jax.grad(lambda x: jaxent.soft_cross_entropy(x, t, implementation="pallas"))(x)

    assert lowered(soft, "tpu", x, x).count("tpu_custom_call") == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CI simulates 8 CPUs)")
@pytest.mark.parametrize("layout", [P("batch", "vocab"), P("batch"), P(None, "vocab")])
def test_logits_xla_partitions_lower_without_the_kernel_for_cuda(layout):
    """Logits split over Auto mesh axes under `jax.jit`: XLA partitions the loss, and a
    Triton call, which has no partitioning rule, would have the logits gathered onto
    every device (1.1 GiB per step for N=8192, C=32768 on eight H100s:
    `python -m benchmarks.sharding --target h100`). The default then takes XLA's
    one-read reduction; inside shard_map the kernel stays."""
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(auto, auto))
    placed = jax.sharding.NamedSharding(mesh, layout)
    x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16, sharding=placed)
    y = spec((64,), jnp.int32)
    text = lowered(loss_and_grad, "cuda", x, y)
    assert kernel_calls(text) == 0 and "reduce" in text
    soft = lowered(lambda x, t: jaxent.soft_cross_entropy(x, t), "cuda", x, x)
    assert kernel_calls(soft) == 0
    with jax.set_mesh(mesh):  # the context's mesh says so even for unplaced logits
        assert kernel_calls(lowered(loss_and_grad, "cuda", spec((64, 1024), jnp.bfloat16), y)) == 0

    def body(x, y):
        return jaxent.cross_entropy(x, y, vocab_axis_name="vocab", batch_axis_name="batch")

    run = jax.shard_map(body, mesh=mesh, in_specs=(P("batch", "vocab"), P("batch")), out_specs=P())
    assert kernel_calls(lowered(jax.value_and_grad(run), "cuda", x, y)) == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CI simulates 8 CPUs)")
def test_the_kernel_choice_reads_every_array_where_the_core_runs():
    """Unplaced logits with targets or a mask split over Auto axes: XLA partitions the
    call all the same, so no kernel. A mesh with an Explicit axis and an Auto one: the
    loss runs itself under shard_map over both (Manual there), so the kernel stays."""
    kinds = jax.sharding.AxisType
    auto = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(kinds.Auto, kinds.Auto))
    split = jax.sharding.NamedSharding(auto, P("batch", "vocab"))
    x, y = spec((64, 1024), jnp.bfloat16), spec((64,), jnp.int32)
    t = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split)
    soft = lowered(lambda x, t: jaxent.soft_cross_entropy(x, t), "cuda", x, t)
    assert kernel_calls(soft) == 0
    mask = jax.ShapeDtypeStruct(x.shape, jnp.bool_, sharding=split)
    masked = lowered(lambda x, y, m: jaxent.cross_entropy(x, y, where=m), "cuda", x, y, mask)
    assert kernel_calls(masked) == 0
    mixed = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(kinds.Explicit, kinds.Auto))

    def on(mesh, layout, a):
        return jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, layout)
        )

    assert (
        kernel_calls(
            lowered(loss_and_grad, "cuda", on(mixed, P("batch"), x), on(mixed, P("batch"), y))
        )
        == 1
    )


@pytest.mark.parametrize("reduction,calls", [("mean", 1), ("none", 2)])
def test_linear_default_takes_the_row_kernel_for_its_float32_logits(reduction, calls):
    """`linear_cross_entropy`'s default ("chunked") forms each sub-block's float32
    logits; their row statistics come from the plain losses' Triton kernel for CUDA, in
    each loop body: "mean" forms the gradient in its forward (one loop), "none" runs a
    forward loop and the backward's recompute (the forward's without the kernel's
    custom backward: `row_stats.forward_stats`). So does "lean"'s forward, over blocks
    of the vocabulary. Split over Auto mesh axes under `jax.jit`, no kernel: XLA's
    one-read reduction ("chunked"), its two reads ("lean")."""
    n, d, v = 4096, 64, 32000
    args = [spec((n, d), jnp.bfloat16), spec((v, d), jnp.bfloat16), spec((n,), jnp.int32)]

    def fn(x, w, y):
        def loss(x, w):
            out = jaxent.linear_cross_entropy(x, w, y, block_size=(1024, 512), reduction=reduction)
            return jnp.sum(out)

        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    assert kernel_calls(lowered(fn, "cuda", *args)) == calls
    lean = functools.partial(jaxent.linear_cross_entropy, implementation="lean")
    lean_grad = jax.grad(lambda x, w, y: jnp.sum(lean(x, w, y, reduction=reduction)))
    assert kernel_calls(lowered(lean_grad, "cuda", *args)) == 1
    if jax.device_count() >= 8:
        auto = jax.sharding.AxisType.Auto
        mesh = jax.make_mesh((8,), ("batch",), axis_types=(auto,))
        split = jax.sharding.NamedSharding(mesh, P("batch"))
        x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=split)
        assert kernel_calls(lowered(fn, "cuda", x, *args[1:])) == 0
        assert kernel_calls(lowered(lean_grad, "cuda", x, *args[1:])) == 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CI simulates 8 CPUs)")
@pytest.mark.parametrize("implementation", [None, "lean"])
def test_linear_default_takes_the_row_kernel_inside_shard_map(implementation):
    """Vocabulary- and data-parallel under shard_map (check_vma=True, as compiled kernels
    allow): each shard's block statistics come from the kernel, typed as varying like
    its logits, and the shards' exchange is unchanged."""
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("batch", "vocab"), axis_types=(auto, auto))

    def body(x, w, y):
        return jaxent.linear_cross_entropy(
            x, w, y, label_smoothing=0.1, vocab_axis_name="vocab", batch_axis_name="batch",
            implementation=implementation,
        )  # fmt: skip

    specs = (P("batch"), P("vocab"), P("batch"))
    run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())
    fn = jax.value_and_grad(run, argnums=(0, 1))
    args = [spec((512, 64), jnp.bfloat16), spec((4096, 64), jnp.bfloat16), spec((512,), jnp.int32)]
    assert kernel_calls(lowered(fn, "cuda", *args)) == 1
