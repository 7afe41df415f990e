"""Suite `linear`: the fused head, forward + backward of the mean loss w.r.t. x and w.

Floor: the three matmuls of the same shapes (logits = x @ w.T, dx = g @ w,
dw = g.T @ x; inputs' dtype, float32 accumulation). Reference for errors: the
materialised "xla" implementation on float64 (CPU) or float32 (elsewhere) inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jaxent

from .one_device import HIDDEN, POSITIONS, TABLE, on_one_device
from .timing import measure, notice

FLOOR = "floor"


def _jaxent(impl):
    return lambda x, w, y: jaxent.linear_cross_entropy(x, w, y, implementation=impl)


def optax_materialised(x, w, y):
    logits = x @ w.T  # logits in the inputs' dtype, as a plain JAX model produces them
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Leanest first: a device's peak memory is only seen where it rises (timing.measure).
# "jaxent default" is "chunked"; "jaxent pallas" (the fused-head kernels, lean's scheme
# on chip) runs on CUDA GPUs only and is skipped with a notice elsewhere.
IMPLEMENTATIONS = {
    "jaxent pallas": _jaxent("pallas"),
    "jaxent lean": _jaxent("lean"),
    "jaxent default": _jaxent(None),
    "jaxent sharded, 1 device": on_one_device(
        jaxent.linear_cross_entropy, (HIDDEN, TABLE, POSITIONS)
    ),
    "jaxent xla": _jaxent("xla"),
    "optax (materialised)": optax_materialised,
}


def three_matmuls(x, w, g):
    f32 = jnp.float32
    logits = jnp.dot(x, w.T, preferred_element_type=f32).astype(x.dtype)
    dx = jnp.dot(g, w, preferred_element_type=f32).astype(x.dtype)
    dw = jnp.dot(g.T, x, preferred_element_type=f32).astype(w.dtype)
    return logits, dx, dw


def inputs(n, d, v, dtype, seed=0):
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (v, d), jnp.float32) / d**0.5).astype(dtype)
    return x, w, jax.random.randint(ky, (n,), 0, v, jnp.int32)


def rel_err(a, b):
    a, b = jnp.asarray(a, b.dtype), jnp.asarray(b)
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def reference(x, w, y, ref_dtype):
    """Loss and (dx, dw) of the materialised "xla" implementation on `ref_dtype` inputs,
    with full-precision matmuls (a GPU would otherwise use TF32 for float32)."""
    step = jax.jit(jax.value_and_grad(_jaxent("xla"), argnums=(0, 1)))
    with jax.default_matmul_precision("highest"):
        return step(x.astype(ref_dtype), w.astype(ref_dtype), y)


def run(case, repeats: int, ref_dtype) -> list[dict]:
    n, d, v, dtype = case
    x, w, y = inputs(n, d, v, jnp.dtype(dtype))
    g = (jax.random.normal(jax.random.PRNGKey(1), (n, v), jnp.float32) * 1e-3).astype(x.dtype)
    fns = {k: jax.value_and_grad(f, argnums=(0, 1)) for k, f in IMPLEMENTATIONS.items()}
    fns[FLOOR] = three_matmuls
    args = {name: (x, w, g) if name == FLOOR else (x, w, y) for name in fns}
    results = measure(fns, args, repeats, skip=notice)
    floor = results.pop(FLOOR)["seconds"]
    del g
    ref_loss, ref_grads = reference(x, w, y, ref_dtype)
    rows = []
    shape = {"N": n, "D": d, "V": v, "dtype": dtype}
    for name, result in results.items():
        loss, (dx, dw) = result.pop("compiled")(x, w, y)
        rows.append({
            "suite": "linear", "implementation": name, **shape, **result,
            "floor_seconds": floor, "floor": "three matmuls of the same shapes",
            "ratio": result["seconds"] / floor,
            "loss_rel_err": rel_err(loss, ref_loss),
            "grad_rel_err": max(rel_err(dx, ref_grads[0]), rel_err(dw, ref_grads[1])),
        })  # fmt: skip
    return rows
