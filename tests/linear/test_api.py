"""linear_cross_entropy: one shared suite run against every implementation.

The oracle for the fused paths is the materialised "xla" reference on the same inputs
(itself checked against float64 NumPy in test_reference.py).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxent

from .. import oracles
from ..kernels import kernel_inputs, kernel_mode
from .grouping import grouped

F32 = jnp.float32
# Each case of the shared suite: (implementation, block_size) — several blocks over the
# 37 positions or 203 classes of `make`, and for "chunked" also strided sub-blocks.
CASES = {
    "chunked": ("chunked", 8),
    "chunked sub-blocks": ("chunked", (8, 2)),
    # The sub-blocks' row statistics from the plain losses' GPU kernel (as on a GPU;
    # interpreted without one), in 8-row x 128-class tiles: two over the 203 classes.
    "chunked row kernel": ("chunked", (8, 2)),
    "lean": ("lean", 32),
    # Each vocabulary block's row statistics from the same kernel, 8 x 128 tiles: 11
    # blocks of 20 classes (V padded to 220, so the kernel reads a class mask).
    "lean row kernel": ("lean", 20),
    # Runs of 4 classes per strided block (a TPU's layout, `grouping`), V padded to 208.
    "lean grouped": ("lean", 16),
    "default": (None, None),
    # The fused-head kernels (`_pallas_kernels`: interpreted without a GPU): blocks of
    # 100 classes (V padded to 300), 32-class tiles, 16-row tiles over the 37 positions.
    "pallas": ("pallas", 100),
    # The TPU kernels (interpreted without a TPU) in lean's runs of 4 classes, as on a
    # TPU: each block read in place from the grouped view of w (25 runs x 3 blocks x 4);
    # 32-row tiles over the 37 positions (a ragged one), each block one class tile.
    "pallas tpu": ("pallas", 100),
}


@pytest.fixture(autouse=True)
def _pallas_kernels(request):
    """Tests of the "pallas" cases run the kernels with small tiles (in the Pallas
    interpreter without a GPU or TPU)."""
    params = getattr(request.node, "callspec", None)
    params = {} if params is None else params.params
    if "pallas tpu" in (params.get("case"), params.get("impl")):
        with kernel_mode("tpu", block_rows=32), grouped(4):
            yield
    elif "pallas" in (params.get("case"), params.get("impl")):
        with kernel_mode(block_rows=16, block_classes=32):
            yield
    elif params.get("case") in ("chunked row kernel", "lean row kernel"):
        with kernel_mode(block_rows=8, block_classes=128):
            yield
    elif params.get("case") == "lean grouped":
        with grouped(4):
            yield
    else:
        yield


def test_lean_row_kernel_reads_a_class_mask_only_where_blocks_are_padded():
    """The "lean" blocks of 29 classes (7 of them) hold V = 203 exactly: the row kernel
    reads the block's logits alone. Blocks of 20 (V padded to 220) hide the padding
    classes behind a mask, one more (N, Bv) operand."""
    x, w, labels, _ = make(0)

    def inputs(block):
        def loss(x):
            return jaxent.linear_cross_entropy(
                x, w, labels, implementation="lean", block_size=block
            )

        with kernel_mode(block_rows=8, block_classes=128):
            return kernel_inputs(jax.make_jaxpr(jax.grad(loss))(x), "row_stats")

    assert inputs(32) == [[(37, 29)]]
    assert inputs(20) == [[(37, 20), (37, 20)]]


def test_grouped_lean_views_w_in_runs():
    """The "lean grouped" case does run grouped: `w` (203 classes in 13 blocks of 16,
    padded to 208) is viewed as 4 runs x 13 blocks x 4 classes; ungrouped, 16 x 13."""

    def shapes(group):
        x, w, labels, _ = make(0)
        with grouped(group):
            return str(jax.make_jaxpr(lambda x, w: jaxent.linear_cross_entropy(
                x, w, labels, implementation="lean", block_size=16))(x, w))  # fmt: skip

    assert "f32[4,13,4,16]" in shapes(4)
    assert "f32[4,13,4,16]" not in shapes(1) and "f32[16,13,16]" in shapes(1)


def make(seed, lead=(37,), d=16, v=203, dtype=F32):
    kx, kw, ky, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, lead + (d,), F32).astype(dtype)
    w = (jax.random.normal(kw, (v, d), F32) * 0.5).astype(dtype)
    labels = jax.random.randint(ky, lead, 0, v, jnp.int32)
    bias = jax.random.normal(kb, (v,), F32).astype(dtype) * 0.1
    return x, w, labels, bias


OPTIONS = {
    "plain": {},
    "smooth_z_cap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
    "weights_ignore": {"class_weights": True, "ignore_index": 3},
    "traced_scalars": {"label_smoothing": jnp.float32(0.2), "z_loss": jnp.float32(1e-2)},
    "positions_mask": {"where": "positions", "label_smoothing": 0.05},
    "logits_mask": {"where": "logits", "class_weights": True},
}


def resolve(opts, labels, v):
    opts = dict(opts)
    if opts.get("class_weights") is True:
        opts["class_weights"] = jnp.linspace(0.5, 2.0, v, dtype=F32)
    if opts.get("where") == "positions":
        opts["where"] = jax.random.uniform(jax.random.PRNGKey(9), labels.shape) > 0.3
    if opts.get("where") == "logits":
        mask = jax.random.uniform(jax.random.PRNGKey(9), labels.shape + (v,)) > 0.2
        opts["where"] = mask | jax.nn.one_hot(labels, v, dtype=bool)
    return opts


def loss_and_grads(impl, x, w, labels, bias, reduction, cotangent, block_size, **opts):
    def f(x, w, bias):
        loss = jaxent.linear_cross_entropy(
            x,
            w,
            labels,
            bias=bias,
            reduction=reduction,
            implementation=impl,
            block_size=block_size,
            **opts,
        )
        return jnp.vdot(cotangent, loss) if reduction == "none" else loss * cotangent

    return jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, bias)


# "chunked row kernel" differs from "chunked sub-blocks" only in its statistics (as
# "lean row kernel" from "lean"); it runs every option set once ("mean": the forward's
# gradient) and the backward's recompute ("none") with the options the kernel treats
# apart (interpreting it is slow on CPU; tests/pallas checks the kernel itself with
# every option).
ROW_KERNEL_RUNS = {("mean", name) for name in OPTIONS} | {
    ("none", "smooth_z_cap"),
    ("none", "logits_mask"),
}


# "sum" and "mean" take the same path inside an implementation (a scalar reduction; "mean"
# then divides by the valid count or weight, the same code for all): "sum" runs once per
# set of derivative rules.
SUM_CASES = {"chunked", "lean", "pallas"}


def _runs(case):
    if case.endswith("row kernel"):
        return ROW_KERNEL_RUNS
    reductions = ["none", "sum", "mean"] if case in SUM_CASES else ["none", "mean"]
    return {(reduction, name) for name in OPTIONS for reduction in reductions}


@pytest.mark.parametrize(
    "case,name,reduction",
    [
        (case, name, reduction)
        for case in sorted(CASES)
        for name in sorted(OPTIONS)
        for reduction in ["none", "sum", "mean"]
        if (reduction, name) in _runs(case)
    ],
)
def test_matches_reference(case, name, reduction):
    x, w, labels, bias = make(0)
    opts = resolve(OPTIONS[name], labels, w.shape[0])
    key = jax.random.PRNGKey(1)
    cot = jax.random.normal(key, labels.shape, F32) if reduction == "none" else jnp.float32(1.7)
    impl, block = CASES[case]
    got = loss_and_grads(impl, x, w, labels, bias, reduction, cot, block, **opts)
    want = loss_and_grads("xla", x, w, labels, bias, reduction, cot, None, **opts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        assert oracles.rel_err(a, b) < 1e-5


# One case per set of derivative rules: "chunked" (token_sum, token_rows), "lean", and
# the fused-head kernels' (shared by the TPU kernels). "default" is "chunked"; sub-blocks
# and grouping change only which positions or classes a block holds
# (`test_matches_reference`); the row kernel's are tests/pallas's, run here once.
DERIVATIVE_CASES = ["chunked", "lean", "pallas"]


@pytest.mark.parametrize(
    "case,reduction",
    [(c, r) for c in DERIVATIVE_CASES for r in ["none", "mean"]]
    + [("chunked row kernel", "mean"), ("lean row kernel", "mean")],
)
def test_second_derivatives_match_reference(case, reduction):
    """Hessian-vector products in (x, w, bias) jointly, forward over reverse and reverse
    over reverse: the hand-written backwards must be differentiable again, with the
    derivatives of what their forward passes saved."""
    x, w, labels, bias = make(3)
    opts = dict(
        OPTIONS["smooth_z_cap"], ignore_index=3, class_weights=jnp.linspace(0.5, 2, 203, dtype=F32)
    )
    cot = jax.random.normal(jax.random.PRNGKey(4), labels.shape, F32)
    primals = (x, w, bias)
    tangents = tuple(
        jax.random.normal(jax.random.PRNGKey(5 + i), a.shape, F32) for i, a in enumerate(primals)
    )
    impl, block = CASES[case]

    def hvps(impl, block):
        def f(x, w, bias):
            loss = jaxent.linear_cross_entropy(
                x, w, labels, bias=bias, reduction=reduction, implementation=impl,
                block_size=block, **opts,
            )  # fmt: skip
            return jnp.vdot(cot, loss) if reduction == "none" else loss

        grad = jax.grad(f, argnums=(0, 1, 2))

        def grad_dot_tangents(*p):
            return sum(jnp.vdot(g, t) for g, t in zip(grad(*p), tangents, strict=True))

        forward = jax.jvp(grad, primals, tangents)[1]
        return forward, jax.grad(grad_dot_tangents, argnums=(0, 1, 2))(*primals)

    got, want = hvps(impl, block), hvps("xla", None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert oracles.rel_err(a, b) < 1e-5


@pytest.mark.parametrize("case", DERIVATIVE_CASES)
def test_derivatives_at_a_zero_coefficient_and_at_full_smoothing(case):
    """d/dλ grad_w(λ·L) at λ = 0 is grad_w(L): a zero cotangent must not cut the
    gradient's derivative (tests/test_categorical.py says why it could); and at ε = 1
    the loss keeps its ε-derivative, the float64 oracle's backward difference."""
    x, w, labels, bias = make(6, lead=(9,), v=150)
    impl, block = CASES[case]

    def loss(w, eps=0.1):
        return jaxent.linear_cross_entropy(
            x, w, labels, bias=bias, label_smoothing=eps, implementation=implementation(impl),
            block_size=block,
        )  # fmt: skip

    mixed = jax.jacfwd(jax.grad(lambda w, lam: lam * loss(w)), argnums=1)(w, 0.0)
    first = jax.grad(loss)(w)
    assert oracles.rel_err(mixed, first) < 1e-6 and float(jnp.max(jnp.abs(first))) > 1e-3

    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(bias)

    def want(eps):
        return oracles.cross_entropy(logits, labels, label_smoothing=eps)[0]

    slope = (want(1.0) - want(1.0 - 1e-6)) / 1e-6  # the loss is linear in ε
    got = jax.grad(lambda eps: loss(w, eps))(jnp.float32(1.0))
    assert oracles.rel_err(got, slope) < 1e-4 and abs(slope) > 0.1


@pytest.mark.parametrize(
    ("impl", "block"), [("chunked", 16), ("chunked", (16, 4)), ("lean", 16), ("pallas", 64)]
)
def test_bfloat16_matches_reference(impl, block):
    x, w, labels, bias = make(2, dtype=jnp.bfloat16)
    got = loss_and_grads(
        impl, x, w, labels, bias, "mean", jnp.float32(1), block, label_smoothing=0.1
    )
    want = loss_and_grads(
        "xla", x, w, labels, bias, "mean", jnp.float32(1), None, label_smoothing=0.1
    )
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert loss.dtype == F32 and oracles.rel_err(loss, ref_loss) < 1e-3
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == jnp.bfloat16
        assert oracles.rel_err(a.astype(F32), b.astype(F32)) < 1e-2


def implementation(impl: str) -> str:
    """The `implementation=` of a test's `impl` ("pallas tpu": the TPU kernels)."""
    return "pallas" if impl == "pallas tpu" else impl


@pytest.mark.parametrize("impl", ["chunked", "lean", "pallas", "pallas tpu"])
@pytest.mark.parametrize("lead", [(2, 3), (5,), (0,)])
def test_leading_dims_small_and_empty_batches(impl, lead):
    x, w, labels, bias = make(3, lead=lead, v=50)
    got = loss_and_grads(implementation(impl), x, w, labels, bias, "mean", jnp.float32(1), 64)
    want = loss_and_grads("xla", x, w, labels, bias, "mean", jnp.float32(1), None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and oracles.rel_err(a, b) < 1e-5


@pytest.mark.parametrize("impl", ["chunked", "lean", "pallas"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float16_gradients_of_a_small_loss_keep_their_precision(impl, reduction):
    """A loss averaged over N positions makes each logit's gradient ~p/N, subnormal in
    float16 for N in the thousands: written in float16 for the matmuls it kept a few
    bits (dw 2e-2 from the float64 truth at N=65536); `reference.gradient_dtype` writes
    it in float32. Here 512 positions are scaled as a mean over 65,536 would be (the
    cotangent an implementation folds into its logit gradient; "chunked" applies a
    scalar reduction's after its matmuls instead). x and w are scaled against each
    other (the same logits) so that the gradient checked is a normal float16: dw with
    large x, dx with large w. Against float64 on the same float16 inputs: within
    DESIGN's 1e-2 and about as close as the reference. (Writing the logit gradient in
    float16 instead fails this: 2e-2 to 3e-2, against 2e-4.)"""
    n, big = 512, 65536
    x, w, labels, _ = make(7, lead=(n,), d=8, v=512)

    def grads(x, w, impl):
        def loss(x, w):
            block = None if impl == "xla" else 128
            out = jaxent.linear_cross_entropy(
                x, w, labels, reduction=reduction, implementation=impl, block_size=block
            )
            return jnp.sum(out) / big if reduction == "none" else out * (n / big)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    for argnum, scale in ((1, 32.0), (0, 1 / 32)):  # dw, then dx
        xs, ws = (x * scale).astype(jnp.float16), (w / scale).astype(jnp.float16)
        want = grads(xs.astype(jnp.float64), ws.astype(jnp.float64), "xla")[argnum]
        reference = grads(xs, ws, "xla")[argnum]
        got = grads(xs, ws, impl)[argnum]
        assert got.dtype == jnp.float16
        err = oracles.rel_err(got.astype(jnp.float64), want)
        assert err < 1e-2 and err < 2 * oracles.rel_err(reference.astype(jnp.float64), want) + 1e-3


@pytest.mark.parametrize("impl", [None, "chunked", "lean", "pallas", "pallas tpu"])
@pytest.mark.parametrize("lead", [(0,), (0, 3), (3, 0)])
def test_empty_batch_with_a_logits_shaped_mask(impl, lead):
    """Nothing valid: the mean is 0 with zero gradients, a logits-shaped `where` too
    (its (N, V) reshape must not infer V from N = 0 elements)."""
    x, w, labels, _ = make(3, lead=lead, v=13)
    mask = jnp.ones(lead + (13,), bool)

    def loss(x, w):
        impl_ = implementation(impl)
        return jaxent.linear_cross_entropy(x, w, labels, where=mask, implementation=impl_)

    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    assert float(value) == 0.0 and dx.shape == x.shape and not np.any(np.asarray(dw))


@pytest.mark.parametrize("impl", ["chunked", "lean", "pallas", "pallas tpu"])
def test_aux_matches_reference(impl):
    x, w, labels, bias = make(4)
    labels = labels.at[0].set(-100)
    kw = dict(bias=bias, ignore_index=-100, z_loss=1e-2, return_aux=True)
    loss, aux = jaxent.linear_cross_entropy(
        x, w, labels, implementation=implementation(impl), block_size=16, **kw
    )
    ref_loss, ref = jaxent.linear_cross_entropy(x, w, labels, implementation="xla", **kw)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ("lse", "z_loss", "accuracy", "weight_sum"):
        np.testing.assert_allclose(getattr(aux, name), getattr(ref, name), rtol=1e-5)
    assert int(aux.num_valid) == int(ref.num_valid) == 36


@pytest.mark.parametrize("case", sorted(CASES))
def test_dropped_positions_with_non_finite_hidden_states(case):
    """A NaN hidden state at a dropped position (padding) leaves the loss finite and its
    dx row exactly 0; dw still meets it through the matmul (0 * NaN), as any matmul
    would, so only dx is checked. Out-of-range labels with class weights stay NaN."""
    impl, block = CASES[case]
    x, w, labels, _ = make(7)
    x = x.at[2].set(jnp.nan).at[5].set(jnp.inf)
    labels = labels.at[2].set(-100)
    where = jnp.ones(labels.shape, bool).at[5].set(False)

    def loss(x):
        return jaxent.linear_cross_entropy(
            x, w, labels, ignore_index=-100, where=where, implementation=impl,
            block_size=block, label_smoothing=0.1,
        )  # fmt: skip

    value, dx = jax.value_and_grad(loss)(x)
    clean_value, clean_dx = jax.value_and_grad(loss)(x.at[2].set(0.0).at[5].set(0.0))
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_array_equal(dx[jnp.array([2, 5])], 0)
    np.testing.assert_allclose(dx, clean_dx, rtol=1e-5, atol=1e-7)
    bad = labels.at[:].set(-100).at[0].set(w.shape[0] + 3)
    weights = jnp.ones(w.shape[0], F32)
    got = jaxent.linear_cross_entropy(
        x[:1], w, bad[:1], ignore_index=-100, class_weights=weights, implementation=impl,
        block_size=block,
    )  # fmt: skip
    assert jnp.isnan(got)


def test_pallas_off_gpu_raises_and_default_is_chunked():
    x, w, labels, _ = make(5)
    with pytest.raises(NotImplementedError, match="cannot serve this call.*backend is 'cpu'"):
        jaxent.linear_cross_entropy(x, w, labels, implementation="pallas")
    np.testing.assert_allclose(
        jaxent.linear_cross_entropy(x, w, labels),
        jaxent.linear_cross_entropy(x, w, labels, implementation="chunked"),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "case", sorted(set(CASES) - {"chunked row kernel", "lean row kernel"}) + ["reference"]
)
def test_grad_of_vmap_over_labels_only_equals_loop(case):
    """Shared x and w, batched labels: each part of the loss is counted once per batch
    element (the sums of the custom_vjps are batched together)."""
    x, w, labels, bias = make(6, lead=(9,))
    many = jax.random.randint(jax.random.PRNGKey(7), (3, 9), 0, w.shape[0])
    impl, block = CASES.get(case, ("xla", None))

    def loss(x, w, y):
        return jaxent.linear_cross_entropy(
            x, w, y, label_smoothing=0.1, implementation=impl, block_size=block
        )

    def batched(x, w):
        return jnp.sum(jax.vmap(lambda y: loss(x, w, y))(many))

    got = jax.grad(batched, argnums=(0, 1))(x, w)
    looped = [jax.grad(loss, argnums=(0, 1))(x, w, y) for y in many]
    for a, parts in zip(got, zip(*looped, strict=True), strict=True):
        assert oracles.rel_err(a, sum(parts)) < 1e-5


def test_vmap_jit_and_no_retrace():
    x, w, labels, _ = make(6, lead=(3, 8))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, labels, eps):
        return jaxent.linear_cross_entropy(x, w, labels, label_smoothing=eps, block_size=4)

    for eps in (0.0, 0.1, 0.2):
        f(x, labels, jnp.float32(eps))
    batched = jax.vmap(lambda a, b: jaxent.linear_cross_entropy(a, w, b))(x, labels)
    looped = jnp.stack([jaxent.linear_cross_entropy(x[i], w, labels[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-5)
    eager = jaxent.linear_cross_entropy(x, w, labels, label_smoothing=0.1, block_size=4)
    np.testing.assert_allclose(f(x, labels, jnp.float32(0.1)), eager, rtol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked", "lean", "pallas"])
@pytest.mark.parametrize("tied", [(1, 4), (0, 3)])
def test_accuracy_ties_go_to_the_smaller_class_id(impl, tied):
    """Two classes tie for the max: the argmax is the smaller id (NumPy's first), the
    label on it is right and the label on the other wrong — whichever block "lean"'s
    strided blocks visit first (V=6 in blocks of 3: {0, 2, 4} then {1, 3, 5}, so 4
    comes before 1, and 0 before 3)."""
    x = jnp.zeros((1, 6), F32).at[0, 0].set(1.0)
    w = jnp.zeros((6, 6), F32).at[tied[0], 0].set(1.0).at[tied[1], 0].set(1.0)
    first = int(np.argmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64).T))
    assert first == min(tied)
    for block in (None, 2, 3):
        block = None if impl == "xla" else block
        for label in tied:
            _, aux = jaxent.linear_cross_entropy(
                x, w, jnp.array([label]), implementation=impl, block_size=block,
                return_aux=True,
            )  # fmt: skip
            assert aux.accuracy == (1.0 if label == first else 0.0), (block, label)


@pytest.mark.parametrize("impl", ["chunked", "lean", "pallas"])
def test_accuracy_with_non_finite_logits_follows_argmax(impl):
    """As `jnp.argmax` over the whole row: +inf is the max in either block, NaN beats
    every number, and of two NaNs the smaller class id wins — also when "lean"'s
    strided blocks visit the larger first (V=40 in blocks of 20: even classes in block
    0, odd ones in block 1)."""
    x = jnp.ones((4, 8), F32)
    w = jnp.zeros((40, 8), F32)
    bias = jnp.zeros((4, 40), F32)
    rows = [bias[0].at[7].set(jnp.inf), bias[1].at[9].set(jnp.nan),
            bias[2].at[10].set(jnp.nan).at[1].set(jnp.nan), bias[3].at[8].set(jnp.inf)]  # fmt: skip
    labels = jnp.array([7, 9, 1, 8])
    for row, label in zip(rows, labels, strict=True):
        kw = dict(bias=row, reduction="none", return_aux=True)
        want = jaxent.linear_cross_entropy(x[:1], w, label[None], implementation="xla", **kw)
        got = jaxent.linear_cross_entropy(
            x[:1], w, label[None], implementation=impl, block_size=20, **kw
        )
        assert want[1].accuracy == 1.0 and got[1].accuracy == want[1].accuracy


def test_numpy_int_block_size_is_accepted():
    x, w, labels, _ = make(3)
    got = jaxent.linear_cross_entropy(
        x, w, labels, implementation="chunked", block_size=np.int64(8)
    )
    want = jaxent.linear_cross_entropy(x, w, labels, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"w": jnp.zeros((10, 3))}, ValueError, r"`w` must have shape \(V, D\) with D = .* = 4"),
        ({"w": jnp.zeros((4, 10))}, ValueError, "A Flax Dense kernel"),
        ({"labels": jnp.zeros((5,), F32)}, TypeError, "`labels` must have an integer dtype"),
        ({"labels": jnp.zeros((4,), int)}, ValueError, r"`labels` must have shape \(5,\)"),
        ({"bias": jnp.zeros(9)}, ValueError, r"`bias` must have shape \(10,\)"),
        ({"implementation": "cuda"}, ValueError, "`implementation` must be one of"),
        ({"block_size": 0}, ValueError, "`block_size` must be a positive int"),
        ({"block_size": 2.0}, TypeError, "`block_size` must be a positive int"),
        ({"block_size": (8, 3)}, ValueError, r"the sub-block to divide the block, got \(8, 3\)"),
        ({"block_size": (8, 0)}, ValueError, "`block_size` must be a positive int"),
        ({"block_size": (4, 2, 1)}, ValueError, r"or a pair .*, got a tuple of 3: \(4, 2, 1\)"),
        (
            {"block_size": (8, 2), "implementation": "lean"},
            ValueError,
            "a pair .* only for implementation 'chunked'",
        ),
        ({"class_weights": jnp.ones(9)}, ValueError, r"the size of the rows of `w`"),
        ({"return_aux": 1}, TypeError, "`return_aux` must be True or False"),
        ({"x": jnp.zeros((5, 4), int)}, TypeError, "`x` must have a floating dtype"),
        ({"where": jnp.ones((5, 9), bool)}, ValueError, "`where` must be broadcastable"),
        ({"axis": 0}, ValueError, r"`axis` must be -1 for linear_cross_entropy .* got 0"),
        ({"axis": 2}, ValueError, r"`axis` must be in \[-2, 2\)"),
        ({"axis": 1.0}, TypeError, "`axis` must be an int"),
    ],
)
def test_errors_name_the_argument(kwargs, error, match):
    args = {"x": jnp.zeros((5, 4)), "w": jnp.zeros((10, 4)), "labels": jnp.zeros(5, int)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        jaxent.linear_cross_entropy(args.pop("x"), args.pop("w"), args.pop("labels"), **args)


def test_axis_minus_one_is_the_class_axis():
    """`axis` is accepted so that `cross_entropy` options carry over; the classes are the
    last axis of x @ w.T, -1 or its positive equivalent."""
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(k[0], (2, 3, 4), F32)
    w = jax.random.normal(k[1], (7, 4), F32)
    labels = jax.random.randint(k[2], (2, 3), 0, 7)
    want = jaxent.linear_cross_entropy(x, w, labels)
    for axis in (-1, 2):
        assert jaxent.linear_cross_entropy(x, w, labels, axis=axis) == want


@pytest.mark.parametrize("case", sorted(CASES) + ["reference"])
def test_scheduled_smoothing_out_of_range_makes_the_gradients_nan(case):
    """The NaN loss of a scheduled label_smoothing outside [0, 1] comes with non-finite
    dx and dw, so a training step's guard on non-finite gradients skips the update."""
    impl, block_size = CASES.get(case, ("xla", None))
    x, w, labels, _ = make(2, lead=(6,))
    loss, (dx, dw) = jax.value_and_grad(
        lambda x, w: jaxent.linear_cross_entropy(
            x, w, labels, label_smoothing=jnp.float32(1.5), implementation=impl,
            block_size=block_size,
        ),
        argnums=(0, 1),
    )(x, w)  # fmt: skip
    assert np.isnan(loss) and np.isnan(np.asarray(dx)).all() and np.isnan(np.asarray(dw)).all()


@pytest.mark.parametrize("case", sorted(CASES) + ["reference"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_traced_scalar_options_get_their_gradient(case, reduction):
    """l is affine in ε and λ: the gradients of traced `label_smoothing` and `z_loss`
    against central differences of the float64 oracle, through each backward."""
    impl, block_size = CASES.get(case, ("xla", None))
    x, w, labels, bias = make(3, lead=(6,))
    cot = jax.random.normal(jax.random.PRNGKey(4), (6,), F32) if reduction == "none" else 1.3
    opts = dict(softcap=3.0, ignore_index=2, reduction=reduction)

    def ours(ls, zl):
        loss = jaxent.linear_cross_entropy(
            x, w, labels, bias=bias, label_smoothing=ls, z_loss=zl, implementation=impl,
            block_size=block_size, **opts,
        )  # fmt: skip
        return jnp.sum(loss * cot)

    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + np.asarray(bias)

    def oracle(ls, zl):
        loss = oracles.cross_entropy(logits, labels, label_smoothing=ls, z_loss=zl, **opts)[0]
        return np.sum(loss * np.asarray(cot))

    got = jax.grad(ours, argnums=(0, 1))(jnp.float32(0.1), jnp.float32(0.01))
    np.testing.assert_allclose(got, oracles.option_gradient(oracle, 0.1, 0.01), rtol=1e-5)


@pytest.mark.parametrize("case", ["chunked", "lean", "lean grouped", "default"])
@pytest.mark.parametrize("dtypes", [(F32, jnp.float64), (jnp.float64, F32)])
def test_one_float64_operand_computes_in_float64(case, dtypes):
    """The logits are float64 when x or w is (`project`): so are every implementation's
    statistics ("lean"'s carry was float32 for float32 x and float64 w)."""
    impl, block_size = CASES[case]
    x, w, labels, bias = make(4, lead=(6,))
    x, w = x.astype(dtypes[0]), w.astype(dtypes[1])

    def loss(x, w, impl, block_size):
        return jaxent.linear_cross_entropy(
            x, w, labels, bias=bias, label_smoothing=0.1, implementation=impl,
            block_size=block_size,
        )  # fmt: skip

    got = jax.value_and_grad(loss, argnums=(0, 1))(x, w, impl, block_size)
    want = jax.value_and_grad(loss, argnums=(0, 1))(x, w, "xla", None)
    assert got[0].dtype == jnp.float64
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    # Each gradient in its operand's dtype: the float32 one rounded from float64.
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_equal_dtypes(got, want)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    v=st.integers(1, 40),
    block=st.integers(1, 16),
    impl=st.sampled_from(["chunked", "lean"]),
    seed=st.integers(0, 10_000),
    options=st.fixed_dictionaries(
        {},
        optional={
            "class_weights": st.just(True),
            "label_smoothing": st.sampled_from([0.1, 1.0]),
            "z_loss": st.just(1e-2),
            "softcap": st.just(2.0),
            "ignore_index": st.just(0),
            "where": st.sampled_from(["positions", "logits"]),
        },
    ),
    reduction=st.sampled_from(["none", "sum", "mean"]),
)
def test_random_sizes_blocks_and_options_match_reference(
    n, d, v, block, impl, seed, options, reduction
):
    """Any small N, D, V, any block size (ragged or larger than N or V), any option mix."""
    x, w, labels, bias = make(seed, lead=(n,), d=d, v=v)
    opts = resolve(options, labels, v)
    cot = jax.random.normal(jax.random.PRNGKey(seed), (n,), F32) if reduction == "none" else 1.0
    got = loss_and_grads(impl, x, w, labels, bias, reduction, cot, block, **opts)
    want = loss_and_grads("xla", x, w, labels, bias, reduction, cot, None, **opts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert oracles.rel_err(a, b) < 1e-5


@pytest.mark.parametrize("case", ["chunked", "lean", "default"])
def test_traced_scalar_option_gradients_come_in_their_dtype(case):
    """bfloat16 options: each block's share is summed in float32, and the gradient comes
    back in bfloat16 (as autodiff gives it for the reference)."""
    impl, block_size = CASES[case]
    x, w, labels, _ = make(5, lead=(37,))

    def grads(impl, block_size):
        return jax.grad(
            lambda ls, zl: jaxent.linear_cross_entropy(
                x, w, labels, label_smoothing=ls, z_loss=zl, reduction="sum",
                implementation=impl, block_size=block_size,
            ),
            argnums=(0, 1),
        )(jnp.bfloat16(0.1), jnp.bfloat16(0.01))  # fmt: skip

    got, want = grads(impl, block_size), grads("xla", None)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2)


@pytest.mark.parametrize("impl", ["chunked", "lean"])
def test_aux_z_loss_follows_the_reduction(impl):
    """aux.z_loss is λ lse² reduced as the loss is — per position, summed, or averaged
    — against float64 NumPy (the shared suite compares "mean" only)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(8, 6)), rng.normal(size=(10, 6))
    labels = rng.integers(0, 10, size=8)
    for reduction in ("none", "sum", "mean"):
        want = oracles.cross_entropy(x @ w.T, labels, z_loss=1e-2, reduction=reduction)[1]
        _, aux = jaxent.linear_cross_entropy(
            jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels), z_loss=1e-2,
            reduction=reduction, return_aux=True, implementation=impl, block_size=4,
        )  # fmt: skip
        np.testing.assert_allclose(aux.z_loss, want["z_loss"], rtol=1e-6, err_msg=reduction)
