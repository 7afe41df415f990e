"""Test configuration: 8 simulated CPU devices (for the sharding tests) and float64.

Both must be set before JAX initialises its backends, hence at import time here.
Enabling x64 only makes float64 *available*; every test states its dtypes.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
