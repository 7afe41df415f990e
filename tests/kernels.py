"""How tests run jaxent's Pallas kernels: in the Pallas interpreter on CPU (CI), compiled
on the kernel's own backend (a GPU's in the device session), with the same small tiles
either way."""

import jax

from jaxent.pallas import interpret_mode, tiles


def kernel_mode(platform: str = "gpu", **sizes):
    """A context for a test of the kernels of `platform` ("gpu": Triton, "tpu":
    Mosaic): `tiles(**sizes)` (compiled) on that backend, `interpret_mode(**sizes)` on
    CPU. On the other accelerator the test is skipped: interpreting these kernels
    there repeats what CI does, at the device session's expense."""
    backend = jax.default_backend()
    if backend == platform:
        return tiles(**sizes)
    if backend != "cpu":
        import pytest

        pytest.skip(f"the {platform} kernels are interpreted in CI; here the {backend}'s")
    return interpret_mode(**sizes, platform=platform)


# kernel_mode arguments of the suites that run the plain losses through both kernels:
# the GPU kernel in 4-row x 16-class tiles, the TPU kernel in its smallest blocks,
# 8 x 128 (crossing class blocks needs C > 128: test_row_stats and test_dispatch have
# such sizes).
PLATFORM_TILES = {
    "gpu": dict(platform="gpu", block_rows=4, block_classes=16),
    "tpu": dict(platform="tpu", block_rows=8, block_classes=128),
}


def each_platform(
    tiles: dict, per_platform: dict = PLATFORM_TILES, autouse: bool = True, one_read=False
):
    """A fixture for a test module (autouse: for every test): the test runs once per
    kernel (the keys of `per_platform`), with `tiles` — the module's kernel_mode
    arguments — set to that kernel's. On a GPU (or TPU) the other backend's kernel is
    skipped: interpreting it there repeats what CI does on CPU, while the device
    session checks the compiled kernel of its own backend.

    `one_read`: a third run for the plain losses' suites, "one-read": the kernel's
    place taken by XLA's one-read variadic reduction (`jaxent._one_read`, what the
    default takes off CUDA and CPU) — inside `kernel_mode`, `implementation="pallas"`
    then runs `row_stats.kernel_stats` / `kernel_soft_stats` with `xla=True`, through
    the same wrapper and custom derivatives as the kernels."""
    import functools

    import pytest

    if one_read:
        per_platform = {**per_platform, "one-read": per_platform["gpu"]}

    @pytest.fixture(autouse=autouse, params=sorted(per_platform))
    def _platform(request, monkeypatch):
        backend = jax.default_backend()
        if backend not in ("cpu", request.param):
            pytest.skip(f"the {request.param} path runs in CI; here the {backend}'s")
        tiles.clear()
        tiles.update(per_platform[request.param])
        if request.param == "one-read":
            from jaxent.pallas import row_stats

            for name in ("kernel_stats", "kernel_soft_stats"):
                fn = getattr(row_stats, name)
                monkeypatch.setattr(row_stats, name, functools.partial(fn, xla=True))

    return _platform


def kernel_inputs(closed_jaxpr, name: str) -> list[list[tuple]]:
    """The input shapes of every `pallas_call` named `name` in a traced program (found
    in loops, conditionals and custom derivatives too): what a kernel is given."""
    from jax.extend import core

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and name in str(eqn.params.get("name")):
                found.append([tuple(v.aval.shape) for v in eqn.invars])
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    if isinstance(sub, core.ClosedJaxpr | core.Jaxpr):
                        walk(getattr(sub, "jaxpr", sub))

    walk(closed_jaxpr.jaxpr)
    return found
