"""How tests run jaxent's Pallas kernels: in the Pallas interpreter on CPU (CI), compiled
on a GPU (the device session), with the same small tiles either way."""

import jax

from jaxent.pallas import interpret_mode, tiles


def kernel_mode(**sizes):
    """A context for a test of the kernels: `interpret_mode(**sizes)` without a GPU,
    `tiles(**sizes)` (compiled) on one."""
    return tiles(**sizes) if jax.default_backend() == "gpu" else interpret_mode(**sizes)
