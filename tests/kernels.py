"""How tests run jaxent's Pallas kernels: in the Pallas interpreter on CPU (CI), compiled
on a GPU (the device session), with the same small tiles either way."""

import jax

from jaxent.pallas import interpret_mode, tiles


def kernel_mode(**sizes):
    """A context for a test of the kernels: `interpret_mode(**sizes)` without a GPU,
    `tiles(**sizes)` (compiled) on one."""
    return tiles(**sizes) if jax.default_backend() == "gpu" else interpret_mode(**sizes)


# interpret_mode arguments of the suites that run the plain losses through both
# kernels: the GPU kernel in 4-row x 16-class tiles, the TPU kernel in its smallest
# blocks, 8 x 128 (crossing class blocks needs C > 128: test_row_stats and
# test_dispatch have such sizes).
PLATFORM_TILES = {
    "gpu": dict(block_rows=4, block_classes=16),
    "tpu": dict(block_rows=8, block_classes=128, platform="tpu"),
}
