"""Every masked load and store of the Triton kernels stays inside its array.

The interpreter hides an access that a missing mask lets past an array's end (see
`bounds.py`); compiled on a GPU it reads garbage or overwrites a neighbour. Here each
kernel runs in the interpreter with ragged rows, classes and depth (tiles of 16 over
N = 37, V = 90, D = 40; 4 x 16 over 7 x 37 for the plain losses) under `checked`,
forward and backward, with the options that add refs (bias, class weights, a
logits-shaped mask, labels, the argmax of `return_aux`).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import jaxent
from jaxent.pallas import interpret_mode

from .bounds import checked
from .test_fused_head import make

F32 = jnp.float32
pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the interpreter's check; a GPU runs the kernels"
)


def _copy_kernel(masked):
    """Doubles a (6,) array in blocks of 4: the second block runs 2 past the end."""

    def kernel(x_ref, o_ref):
        r0 = pl.program_id(0) * 4
        inside = r0 + jnp.arange(4) < 6 if masked else None
        value = plgpu.load(x_ref.at[pl.ds(r0, 4)], mask=inside, other=0.0)
        plgpu.store(o_ref.at[pl.ds(r0, 4)], value * 2, mask=inside)

    return kernel


@pytest.mark.parametrize("masked", [False, True])
def test_the_check_sees_what_the_interpreter_hides(monkeypatch, masked):
    """Unmasked, the last block's load and store each run 2 elements past the end,
    and the interpreter still returns the right numbers; the check flags both."""
    x = jnp.arange(6, dtype=F32)
    with checked(monkeypatch) as seen:
        call = pl.pallas_call(
            _copy_kernel(masked), out_shape=jax.ShapeDtypeStruct((6,), F32), grid=(2,),
            interpret=True,
        )  # fmt: skip
        got = jax.jit(call)(x)
    assert (got == 2 * x).all()
    assert (seen.traced, seen.tiles) == (2, 4)
    if masked:
        assert seen.out_of_bounds == []
    else:
        assert seen.out_of_bounds == [
            "load of a (4,) view of a (6,) ref: 2 elements",
            "store of a (4,) view of a (6,) ref: 2 elements",
        ]


def _linear_inputs():
    """test_fused_head's inputs (N=37, D=40, V=90), 3 ignored labels, a logits mask."""
    x, w, labels, bias = make(0)
    labels = labels.at[:3].set(5)
    where = (jax.random.uniform(jax.random.PRNGKey(1), (37, 90)) > 0.2) | jax.nn.one_hot(
        labels, 90, dtype=bool
    )
    return x, w, labels, bias, where


@pytest.mark.parametrize("implementation", ["pallas", "lean"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_linear_kernels_stay_in_bounds(monkeypatch, implementation, options):
    """The fused-head statistics and gradient kernels ("pallas"), and "lean"'s row
    kernel over its float32 logit blocks, forward and backward."""
    x, w, labels, bias, where = _linear_inputs()
    opts = dict(reduction="none", return_aux=True)
    if options == "all":
        opts.update(
            bias=bias, where=where, class_weights=jnp.linspace(0.5, 2.0, 90, dtype=F32),
            ignore_index=5, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
        )  # fmt: skip
    cotangent = jax.random.normal(jax.random.PRNGKey(1), labels.shape, F32)

    def loss(x, w):
        per_token, aux = jaxent.linear_cross_entropy(
            x, w, labels, implementation=implementation, block_size=45, **opts
        )
        return jnp.sum(per_token * cotangent), aux.accuracy

    tiles = dict(block_rows=16, block_classes=16, block_depth=16)
    with checked(monkeypatch) as seen, interpret_mode(**tiles):
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, w))
    assert seen.traced > 0 and seen.tiles > 0
    assert seen.out_of_bounds == []


@pytest.mark.parametrize("soft", [False, True])
def test_row_kernel_stays_in_bounds(monkeypatch, soft):
    """The plain losses' row kernel: logits, targets, a logits-shaped mask and class
    weights in ragged tiles, with the argmax."""
    n, c = 7, 37
    kx, kt, km = jax.random.split(jax.random.PRNGKey(2), 3)
    logits = jax.random.normal(kx, (n, c), F32)
    labels = jax.random.randint(kt, (n,), 0, c)
    targets = jax.nn.softmax(jax.random.normal(kt, (n, c), F32))
    where = (jax.random.uniform(km, (n, c)) > 0.2) | jax.nn.one_hot(labels, c, dtype=bool)
    opts = dict(where=where, class_weights=jnp.linspace(0.5, 2.0, c, dtype=F32),
                label_smoothing=0.1, z_loss=1e-3, softcap=4.0, return_aux=True)  # fmt: skip
    if soft:
        loss = lambda z: jaxent.soft_cross_entropy(z, targets, implementation="pallas", **opts)  # noqa: E731
    else:
        loss = lambda z: jaxent.cross_entropy(z, labels, implementation="pallas", **opts)  # noqa: E731

    with checked(monkeypatch) as seen, interpret_mode(block_rows=4, block_classes=16):
        jax.block_until_ready(jax.jit(jax.grad(loss, has_aux=True))(logits))
    assert seen.traced > 0 and seen.tiles > 0
    assert seen.out_of_bounds == []
