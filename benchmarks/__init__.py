"""jaxent benchmarks: `python -m benchmarks --help`."""
