"""Suite `plain`: losses on given logits, forward + backward of the mean loss.

Floor: one read + one write pass over the logits (a jitted `2 * x`), the least any
functional loss's backward must move. Reference for errors: log-softmax + gather in
float64 on CPU (float32 elsewhere), on the same (rounded) inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import jaxent

from .one_device import LOGITS, POSITIONS, on_one_device
from .timing import measure, notice

FLOOR = "floor"


def naive_loss(x, y):
    lp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


def one_read_loss(x, y):
    """`cross_entropy`'s rows with XLA's one-read reduction (`jaxent._one_read`), the
    default's forward on accelerators other than CUDA, timed here on any accelerator
    (on a GPU the default takes the Triton kernel instead). Skipped on a CPU, where
    the default keeps two reads: the variadic reduction measured 1.8-10x slower there
    (README, "Backends")."""
    from jaxent import _stable
    from jaxent.pallas import row_stats

    if jax.default_backend() == "cpu":
        raise NotImplementedError("the one-read reduction is for accelerators")
    stats = functools.partial(row_stats.kernel_stats, xla=True)
    return jnp.mean(_stable.categorical_rows(x, y, stats=stats).loss)


IMPLEMENTATIONS = {
    "jaxent": lambda x, y: jaxent.cross_entropy(x, y),  # the Pallas kernel on CUDA, else XLA
    "jaxent xla": lambda x, y: jaxent.cross_entropy(x, y, implementation="xla"),
    # GPU and TPU only: on a CPU it raises NotImplementedError and `measure` skips it with a
    # notice.
    "jaxent pallas": lambda x, y: jaxent.cross_entropy(x, y, implementation="pallas"),
    "jaxent one-read xla": one_read_loss,
    "jaxent sharded, 1 device": on_one_device(jaxent.cross_entropy, (LOGITS, POSITIONS)),
    "optax": lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean(),
    "naive jnp": naive_loss,
}


def inputs(n, c, dtype, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = (jax.random.normal(kx, (n, c), jnp.float32) * 2).astype(dtype)
    return x, jax.random.randint(ky, (n,), 0, c, jnp.int32)


def rel_err(a, b):
    a, b = jnp.asarray(a, b.dtype), jnp.asarray(b)
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def run(case, repeats: int, ref_dtype) -> list[dict]:
    n, c, dtype = case
    x, y = inputs(n, c, jnp.dtype(dtype))
    fns = {name: jax.value_and_grad(f) for name, f in IMPLEMENTATIONS.items()}
    fns[FLOOR] = lambda x, y: 2 * x
    results = measure(fns, dict.fromkeys(fns, (x, y)), repeats, skip=notice)
    floor = results.pop(FLOOR)["seconds"]
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(naive_loss))(x.astype(ref_dtype), y)
    rows = []
    shape = {"N": n, "C": c, "dtype": dtype}
    for name, result in results.items():
        loss, grad = result.pop("compiled")(x, y)
        rows.append({
            "suite": "plain", "implementation": name, **shape, **result,
            "floor_seconds": floor, "floor": "one read+write pass over the logits",
            "ratio": result["seconds"] / floor,
            "loss_rel_err": rel_err(loss, ref_loss), "grad_rel_err": rel_err(grad, ref_grad),
        })  # fmt: skip
    return rows
