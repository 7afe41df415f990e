"""Compile for an H100 or a TPU (v5p; v4, v5e, v6e for the kernels) on a machine without
one: XLA's deviceless ahead-of-time path.

    pip install "jax[cuda12]"        # the CUDA plugin; no GPU or driver needed
    python -m benchmarks.deviceless [--out DIR] [--target h100]
    pip install "jax[tpu]"           # libtpu; no TPU needed
    python -m benchmarks.deviceless --target v5p [--out DIR]
    python -m benchmarks.deviceless --target v6e --skip memory [--out DIR]

`jax.experimental.topologies` describes the device (`TARGETS`: a GPU by its
properties in XLA's GpuTargetConfig text format, a TPU by a topology name libtpu
knows) and `jit(...).lower(...).compile()` runs XLA's whole pipeline for it: fusion,
scheduling, buffer assignment, and the compilation of the Pallas kernels — by Triton
for sm_90 (a tile that overflows the SM's shared memory fails here as it would on the
device), by Mosaic for the TPU (likewise a block that overflows vector memory).
jaxent's Python-level choices (block sizes, the kernel choice) read
`jax.default_backend()`, which is "cpu" here, so it is patched to "gpu" or "tpu" for
the duration, as on the device.

What it measures, without the device:
- memory: the compiled temp of `linear_cross_entropy`'s forward + backward at the LM
  heads in bfloat16 (`benchmarks.memory`'s table), as the target's compiler assigns it;
- kernels: every Pallas kernel of jaxent for the target, with every option, compiles
  (and each call's temp); on the GPU also the tiles of `python -m benchmarks.sweep`,
  and what each kernel's PTX says (`benchmarks.ptx`: warpgroup MMAs or not, access
  widths), read from the PTX XLA is made to dump (`--xla_dump_to`, a temporary folder);
- traffic: the logits-sized reads and writes of the plain losses (`hlo.passes`), and
  the block-sized ones of the fused head's loops, "lean" against "pallas"
  (`hlo.loop_passes`).
What it cannot: times (nothing runs), and the GEMM autotuner's picks (deviceless
compilation takes XLA's default configurations; a cuBLAS workspace may differ).
Writes deviceless.md and deviceless.json under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import ptx

# Published properties of an H100 SXM5 80GB (sm_90): 132 SMs, 228 KiB shared memory per
# SM of which 227 KiB per block (opt-in), 50 MiB L2, 3.35 TB/s.
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# name -> (jax platform, jaxent's backend name, how to describe the device). A GPU is
# described by its properties (needs jax's CUDA plugin); a TPU by a topology name that
# libtpu knows (needs `pip install "jax[tpu]"`), compiled for one of its chips.
TARGETS = {
    "h100": ("cuda", "gpu", H100),
    "v5p": ("tpu", "tpu", "v5p:2x2x1"),
    # Other TPU generations, for the kernel and traffic checks (`--skip memory`).
    "v4": ("tpu", "tpu", "v4:2x2x1"),
    "v5e": ("tpu", "tpu", "v5e:2x2"),
    "v6e": ("tpu", "tpu", "v6e:2x2"),
}


# TPU slices of eight chips, for the sharding suite's meshes (a GPU target takes any
# number of devices in one host).
TPU_EIGHT = {"v5p": "v5p:2x2x2"}
EIGHT_DEVICES = ("h100", *TPU_EIGHT)


@contextlib.contextmanager
def target_devices(target: str = "h100", count: int = 1):
    """Within: `count` shape-only devices of `target` (a TPU: 1, or 8 for those of
    `TPU_EIGHT`) that programs compile for, and jaxent decides as on that backend. Must
    run before any JAX backend starts."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("target_devices() must run before JAX starts a backend")
    jax.config.update("jax_platforms", "cpu")  # the plugin then only compiles
    platform, backend, description = TARGETS[target]
    if platform == "tpu":
        name = description if count == 1 else TPU_EIGHT[target]
        topology = topologies.get_topology_desc(name, platform="tpu")
    else:
        topology = topologies.get_topology_desc(
            platform=platform, target_config=description, topology=f"1x1x{count}"
        )
    with mock.patch.object(jax, "default_backend", return_value=backend):
        yield topology.devices[:count]


@contextlib.contextmanager
def compile_only(target: str = "h100"):
    """Within: shape-only inputs placed with the yielded sharding compile for `target`
    (one device of it), and jaxent decides as on that backend. Must run before any JAX
    backend starts."""
    with target_devices(target) as devices:
        mesh = jax.sharding.Mesh(np.array(devices), ("d",))
        yield jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def compiled(fn, shapes, sharding, argnums=0):
    """`jit(value_and_grad(fn, argnums))` compiled for the target; `shapes`: (shape,
    dtype) pairs, by default the first argument differentiated."""
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    return jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).compile()


def kernel_cases(platform: str = "cuda"):
    """(name, loss of shape-only args, arg shapes, kernels it must contain): the plain
    losses' row-statistics kernel (also in `linear_cross_entropy`'s default) and the
    fused head's two kernels (Triton for "cuda", Mosaic for "tpu")."""
    import jaxent

    n, c = 8192, 128256
    options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    weights = ((c,), jnp.float32)

    def pallas(fn):
        return functools.partial(fn, implementation="pallas")

    cases = []
    for dtype in (jnp.bfloat16, jnp.float32):
        logits, labels, tag = ((n, c), dtype), ((n,), jnp.int32), jnp.dtype(dtype).name
        cases += [
            (f"cross_entropy {tag}", pallas(jaxent.cross_entropy), [logits, labels], 1),
            (f"cross_entropy {tag}, all options",
             lambda z, y, w: pallas(jaxent.cross_entropy)(z, y, class_weights=w, **options),
             [logits, labels, weights], 1),
            (f"soft_cross_entropy {tag}, smoothing, z-loss, softcap",
             lambda z, t: pallas(jaxent.soft_cross_entropy)(
                 z, t, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
             [logits, logits], 1),
        ]  # fmt: skip
    cases.append(("cross_entropy float32, classifier N=65536 C=1000", pallas(jaxent.cross_entropy),
                  [((65536, 1000), jnp.float32), ((65536,), jnp.int32)], 1))  # fmt: skip
    # Transforms a training step wraps the loss in: vmap over a leading axis (the kernel
    # then runs with a batched grid), rematerialisation, and a scan over microbatches.
    batched = [((4, n // 4, c), jnp.bfloat16), ((4, n // 4), jnp.int32)]
    vmapped = jax.vmap(pallas(jaxent.cross_entropy))
    remat = jax.checkpoint(lambda z, y: pallas(jaxent.cross_entropy)(z, y, **options))

    def microbatches(z, y):
        def step(total, zy):
            return total + pallas(jaxent.cross_entropy)(*zy, reduction="sum"), None

        return lax.scan(step, jnp.zeros((), jnp.float32), (z, y))[0]

    cases += [
        ("cross_entropy bfloat16 under vmap", lambda z, y: vmapped(z, y).sum(), batched, 1),
        ("cross_entropy bfloat16, all options, under checkpoint", remat,
         [((n, c), jnp.bfloat16), ((n,), jnp.int32)], 1),
        ("cross_entropy bfloat16 in a scan over 4 microbatches", microbatches, batched, 1),
    ]  # fmt: skip

    def head(**kw):
        return lambda x, w, y, b: jaxent.linear_cross_entropy(
            x, w, y, bias=b, implementation="pallas", **kw
        )

    # "none" with a sum: the backward's arbitrary cotangents.
    every = head(reduction="none", **options)
    for name, (d, v) in {"Llama-3": (4096, 128256), "Gemma-2": (2304, 256000)}.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            shapes = [((n, d), dtype), ((v, d), dtype), ((n,), jnp.int32), ((v,), dtype)]
            tag = f"{name} {jnp.dtype(dtype).name}"
            cases += [
                (f"linear_cross_entropy pallas {tag}, bias", head(), shapes, 2),
                (f"linear_cross_entropy pallas {tag}, all options, reduction=none",
                 lambda *a: every(*a).sum(), shapes, 2),
            ]  # fmt: skip
        # The default ("chunked"): the plain losses' row-statistics kernel on each
        # sub-block's float32 logits where the gradient is formed, on CUDA (on a TPU
        # XLA's one-read reduction, as for the plain losses).
        cases.append((f"linear_cross_entropy default {tag}, all options",
                      lambda x, w, y, b: jaxent.linear_cross_entropy(x, w, y, bias=b, **options),
                      shapes, int(platform == "cuda")))  # fmt: skip
        # bfloat16 (the last shapes): class weights, a logits-shaped mask and aux.
        extra = [((v,), jnp.float32), ((n, v), jnp.bool_)]
        cases.append((f"linear_cross_entropy pallas {tag}, class weights, where, aux",
                      lambda x, w, y, b, cw, m: jaxent.linear_cross_entropy(
                          x, w, y, bias=b, class_weights=cw, where=m, implementation="pallas",
                          return_aux=True)[0],
                      shapes + extra, 2))  # fmt: skip
    return cases


# The custom calls of compiled Pallas kernels: Triton on a GPU, Mosaic on a TPU.
KERNEL_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


# The name of the programs whose PTX `main` has XLA dump (`--xla_dump_hlo_module_re`).
PTX_PROBE = "kernel_case"


def check(name, fn, shapes, kernels, sharding, ptx_dir=None) -> dict:
    """Compile one case; with `ptx_dir` (where XLA dumps PTX) also read its kernels' PTX
    (`benchmarks.ptx`) and empty the folder for the next case."""
    row = {"case": name, "shapes": [[list(s), jnp.dtype(d).name] for s, d in shapes]}

    def probe(*args):
        return fn(*args)

    probe.__name__ = PTX_PROBE  # the module name: only these programs' PTX is dumped
    try:
        exe = compiled(probe, shapes, sharding)
    except Exception as err:  # a kernel that does not compile: recorded, not fatal
        return {**row, "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        if ptx_dir is not None:
            row["ptx"] = ptx.read_dump(ptx_dir)
            for path in ptx_dir.iterdir():
                path.unlink()
    text = exe.as_text()
    found = sum(text.count(f'custom_call_target="{t}"') for t in KERNEL_CALLS)
    row.update(ok=found >= kernels, kernels=found,
               temp_bytes=exe.memory_analysis().temp_size_in_bytes)  # fmt: skip
    if not row["ok"]:
        row["error"] = f"expected {kernels} Pallas kernels, found {found}"
    return row


def tile_cases():
    """The fused-head tiles of `python -m benchmarks.sweep pallas` (Llama-3, bf16) and the
    forward kernel's of `... sweep row_stats`."""
    import jaxent
    import jaxent.pallas

    from .sweep import PALLAS, ROW_STATS_TILES

    n, d, v = 8192, 4096, 128256
    cases = []
    for block, (rows, classes, depth) in PALLAS:

        def loss(x, w, y, block=block, tile=(rows, classes, depth)):
            with jaxent.pallas.tiles(block_rows=tile[0], block_classes=tile[1],
                                     block_depth=tile[2]):  # fmt: skip
                return jaxent.linear_cross_entropy(x, w, y, implementation="pallas",
                                                   block_size=block)  # fmt: skip

        shapes = [((n, d), jnp.bfloat16), ((v, d), jnp.bfloat16), ((n,), jnp.int32)]
        cases.append((f"pallas block={block} tile={(rows, classes, depth)}", loss, shapes, 2))
    for rows, classes in ROW_STATS_TILES:

        def loss(z, y, tile=(rows, classes)):
            with jaxent.pallas.tiles(block_rows=tile[0], block_classes=tile[1]):
                return jaxent.cross_entropy(z, y, implementation="pallas")

        shapes = [((n, v), jnp.bfloat16), ((n,), jnp.int32)]
        cases.append((f"row_stats rows={rows} classes={classes}", loss, shapes, 1))
    return cases


def traffic_cases(device=None):
    """(name, loss, arg shapes) of the plain losses: `benchmarks.plain`'s implementations
    at its GPU shapes (the sharded code path on a mesh of `device`, the target's), and
    jaxent's with every option."""
    import jaxent

    from .one_device import LOGITS, POSITIONS, on_one_device
    from .plain import IMPLEMENTATIONS
    from .shapes import PLAIN

    options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    fns = dict(IMPLEMENTATIONS)
    fns["jaxent sharded, 1 device"] = on_one_device(
        jaxent.cross_entropy, (LOGITS, POSITIONS), device
    )
    fns["jaxent, all options"] = lambda z, y: jaxent.cross_entropy(z, y, **options)
    fns["jaxent xla, all options"] = lambda z, y: jaxent.cross_entropy(
        z, y, implementation="xla", **options
    )
    fns["jaxent pallas, all options"] = lambda z, y: jaxent.cross_entropy(
        z, y, implementation="pallas", **options
    )
    return [(f"{name}", fn, [((n, c), jnp.dtype(dtype)), ((n,), jnp.int32)])
            for n, c, dtype in PLAIN["gpu"] for name, fn in fns.items()]  # fmt: skip


def traffic(name, fn, shapes, sharding) -> dict:
    """Whole-logits reads + writes of the compiled forward + backward (`hlo.passes`)."""
    from . import hlo

    (n, c), dtype = shapes[0]
    try:
        exe = compiled(fn, shapes, sharding)
    except NotImplementedError as err:  # "jaxent pallas" off CUDA
        print(f"{name}: skipped ({str(err)[:120]})")
        return None
    total, lines = hlo.passes(exe.as_text(), f"{n},{c}")
    return {"case": name, "N": n, "C": c, "dtype": dtype.name, "passes": total,
            "model_ratio": total / 2, "instructions": lines}  # fmt: skip


def head_traffic_cases():
    """(name, loss, arg shapes, block) of `linear_cross_entropy`'s loops over vocabulary
    blocks ("lean": XLA; "pallas": the fused-head kernels) at the LM heads, bfloat16,
    N=8192, each with its default block for the target."""
    import jaxent
    from jaxent.linear.api import default_vocab_block_size

    from .memory import HEADS

    n, cases = 8192, []
    for head, (d, v) in HEADS.items():
        shapes = [((n, d), jnp.bfloat16), ((v, d), jnp.bfloat16), ((n,), jnp.int32)]
        block = default_vocab_block_size(n, v)
        for impl in ("lean", "pallas"):
            loss = functools.partial(jaxent.linear_cross_entropy, implementation=impl)
            cases.append((f"{head} {impl}", loss, shapes, block))
    return cases


def head_traffic(name, fn, shapes, block, sharding) -> dict:
    """Reads + writes of block-sized (N, Bv) arrays per vocabulary block, in device
    memory, by the compiled forward + backward with the gradients of x and w
    (`hlo.loop_passes`), and their bytes per logit."""
    from . import hlo

    exe = compiled(fn, shapes, sharding, argnums=(0, 1))
    n = shapes[0][0][0]
    total, moved, lines = hlo.loop_passes(exe.as_text(), f"{n},{block}")
    return {"case": name, "N": n, "block": block, "passes": total,
            "bytes_per_logit": moved / (n * block), "instructions": lines}  # fmt: skip


def _table(caption: str, columns: list, rows: list) -> list[str]:
    """Markdown lines: a blank line, the caption, a blank line, the table."""

    def row(cells):
        return "| " + " | ".join(map(str, cells)) + " |"

    return ["", caption, "", row(columns), "|" + "---|" * len(columns), *map(row, rows)]


PTX_NOTE = (
    "The PTX column reads each Pallas kernel's PTX for sm_90a (`benchmarks.ptx`):"
    " its matrix instructions (Hopper's warpgroup `wgmma`, Ampere's `mma.sync`, or"
    " none: CUDA cores), the widest global load and store per thread, threads per"
    " block (float32 dots take IEEE products on the CUDA cores on purpose)"
)


def markdown(label, memory_rows, kernel_rows, tile_rows, traffic_rows=(), head_rows=()) -> str:
    from . import memory

    lines = [memory.markdown(memory_rows, label) if memory_rows else f"Compiled for {label}."]
    with_ptx = any("ptx" in r for r in kernel_rows + tile_rows)
    if kernel_rows or tile_rows:
        header = "| case | compiles | Pallas kernels | temp MiB |" + " PTX |" * with_ptx
        lines += ["", f"Kernels compiled for {label}" + f". {PTX_NOTE}" * with_ptx + ":", "",
                  header, "|---|---|---|---|" + "---|" * with_ptx]  # fmt: skip
    for r in kernel_rows + tile_rows:
        temp = f"{r['temp_bytes'] / 2**20:.0f}" if "temp_bytes" in r else ""
        status = "yes" if r["ok"] else f"no: {r['error'][:80]}"
        cells = [r["case"], status, r.get("kernels", ""), temp]
        if with_ptx:
            cells.append("<br>".join(f"{k.removeprefix('jaxent_')}: {ptx.describe(v)}"
                                     for k, v in sorted(r.get("ptx", {}).items())))  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if traffic_rows:
        caption = (f"Plain losses, forward + backward compiled for {label}: whole-logits "
                   "reads + writes (`benchmarks.hlo.passes`, arrays of the logits' shape in "
                   "any dtype); the floor, one read + one write, is 2. A model of a "
                   "bandwidth-bound step, not a time.")  # fmt: skip
        lines += _table(caption, ["loss", "N", "C", "dtype", "passes", "÷ floor"],
                        [[r["case"], r["N"], r["C"], r["dtype"], r["passes"],
                          f"{r['model_ratio']:.1f}"] for r in traffic_rows])  # fmt: skip
    if head_rows:
        caption = (f"`linear_cross_entropy`, forward + backward (gradients of x and w) "
                   f"compiled for {label}: per vocabulary block of Bv classes, whole reads "
                   "+ writes of (N, Bv) arrays in device memory (`benchmarks.hlo.loop_passes`;"
                   " the matmuls' x and w not included) and their bytes per logit. A model "
                   "of the traffic around the matmuls, not a time.")  # fmt: skip
        lines += _table(caption, ["head, implementation", "N", "Bv", "passes", "bytes / logit"],
                        [[r["case"], r["N"], r["block"], r["passes"],
                          f"{r['bytes_per_logit']:.0f}"] for r in head_rows])  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deviceless", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--target", choices=sorted(TARGETS), default="h100")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip", nargs="*", choices=["memory", "kernels", "tiles", "traffic", "head"],
                   default=[])  # fmt: skip
    args = p.parse_args(argv)
    from . import memory

    platform = TARGETS[args.target][0]
    skip = set(args.skip) | (set() if platform == "cuda" else {"tiles"})  # GPU sweeps
    ptx_dir = None
    if platform == "cuda" and not {"kernels", "tiles"} <= skip:
        # XLA reads its flags when the first backend starts, which is below.
        ptx_dir = Path(tempfile.mkdtemp(prefix="jaxent-ptx-"))
        flags = f"--xla_dump_to={ptx_dir} --xla_dump_hlo_module_re=jit_{PTX_PROBE}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    with compile_only(args.target) as sharding:
        label = (f"{args.target} (compile only, deviceless), jax {jax.__version__}, "
                 "bfloat16 unless stated")  # fmt: skip
        parts = {}
        parts["memory"] = [] if "memory" in skip else memory.run(sharding=sharding)
        for part, cases in (("kernels", functools.partial(kernel_cases, platform)),
                            ("tiles", tile_cases)):  # fmt: skip
            parts[part] = [] if part in skip else [
                check(*case, sharding, ptx_dir) for case in cases()
            ]  # fmt: skip
            for r in parts[part]:
                print(f"{r['case']}: {'ok' if r['ok'] else r['error']}", flush=True)
        cases = traffic_cases(sharding.mesh.devices.flat[0])
        rows = [] if "traffic" in skip else [traffic(*c, sharding) for c in cases]
        parts["traffic"] = [r for r in rows if r is not None]
        parts["head"] = [] if "head" in skip else [
            head_traffic(*case, sharding) for case in head_traffic_cases()
        ]  # fmt: skip
    if ptx_dir is not None:  # each case emptied it; the folder itself goes too
        shutil.rmtree(ptx_dir, ignore_errors=True)
    text = markdown(label, *parts.values())
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "deviceless.md").write_text(text)
        (args.out / "deviceless.json").write_text(json.dumps({"target": label, **parts}, indent=2))
    failed = [r["case"] for r in parts["kernels"] if not r["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} kernel case(s) do not compile: {failed}")


if __name__ == "__main__":
    main()
