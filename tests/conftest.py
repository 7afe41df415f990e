"""Test configuration: 8 simulated CPU devices (for the sharding tests), float64,
float32 matmuls in full float32, and quick CPU code generation.

All are set before JAX initialises its backends, hence at import time here.
Enabling x64 only makes float64 *available*; every test states its dtypes.
"""

import importlib.util
import os

flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Most of the suite's time is compiling many small programs, and on CPU much of that
# is LLVM optimising machine code the tests run once. Level 0 cuts CI's time by about
# a quarter (990 -> 713 s on a 2-core VM). It changes no HLO pass, only how machine
# code is optimised: buffer assignment, hence every `memory_analysis` size the tests
# assert, stays the same.
# Only on CPU-only installs: where an accelerator's plugin is installed the suite
# compiles for it, as a user's program would.
accelerator_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
if "xla_backend_optimization_level" not in flags and not any(
    importlib.util.find_spec(name) for name in accelerator_plugins
):
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

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
