"""Test configuration: 8 simulated CPU devices (for the sharding tests), float64, and
float32 matmuls in full float32.

All are set before JAX initialises its backends, hence at import time here.
Enabling x64 only makes float64 *available*; every test states its dtypes.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# float32 matmuls in full float32 on every backend (a GPU's default may use TF32, a
# TPU's one bfloat16 pass): references and the kernels (which take float32 products,
# `Precision.HIGHEST`) then agree to float32 rounding wherever the suite runs. CPU
# matmuls are float32 anyway.
jax.config.update("jax_default_matmul_precision", "highest")

from hypothesis import settings  # noqa: E402

# The property tests draw the same examples on every run, so that CI is repeatable;
# HYPOTHESIS_PROFILE=explore draws new ones (a local fuzzing run).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
