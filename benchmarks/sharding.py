"""Communication per training step on a mesh of simulated CPU devices, from the HLO.

    python -m benchmarks --suite sharding [--quick] [--out DIR]

For each mesh (data parallel d x 1, vocabulary parallel 1 x d, d = 2, 4, 8, and 2 x 4)
the forward + backward step of a loss is compiled — from shapes only, nothing runs, so
realistic sizes cost no memory — and the bytes its collectives move per device per
step are summed (`benchmarks.hlo`; a collective in a loop counts once per iteration),
as buffer sizes and as what ring algorithms send:

- `shard_map`: jaxent with `vocab_axis_name` / `batch_axis_name` inside `jax.shard_map`;
- `jit (Auto axes)`: jaxent under `jax.jit` on NamedSharding inputs, partitioned by XLA;
- `jit (Auto axes), lean`: the same with implementation="lean" (linear_cross_entropy);
- `jit (Explicit axes)`: the same on a `jax.make_mesh` default mesh, where jaxent runs
  itself under `shard_map`;
- `baseline`: all-gather the logits (or, for the fused head, `w`) over the vocabulary
  axis, then optax's loss on whole rows — what a loss without vocabulary sharding needs.

Needs 8 devices, so XLA_FLAGS must hold --xla_force_host_platform_device_count=8 before
JAX starts; `python -m benchmarks --suite sharding` runs this module in a subprocess
with the flag set. Writes sharding.json and sharding.md.

    python -m benchmarks.sharding --target h100 [--quick] [--out DIR]   # jax[cuda12]
    python -m benchmarks.sharding --target v5p [--quick] [--out DIR]    # jax[tpu]

compiles the same steps for eight H100s in one host, or a v5p slice of 2x2x2 chips,
without them (`benchmarks.deviceless`): their compilers partition and schedule the
collectives differently from XLA:CPU (they move an all-reduce that accumulates into a
loop's carry out of the loop), which is what matters with Auto axes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxent

from . import deviceless, hlo, timing

AXES = ("batch", "vocab")
MESHES = [(2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8), (2, 4)]
QUICK_MESHES = [(8, 1), (1, 8), (2, 4)]
PLAIN = {"full": (8192, 32768), "quick": (1024, 4096)}  # N, C
LINEAR = {"full": (8192, 1024, 32768), "quick": (1024, 256, 4096)}  # N, D, V
NAMES = dict(batch_axis_name="batch", vocab_axis_name="vocab")


def _mean_over_batch(per_position):
    """The global mean of per-position losses inside shard_map. Every vocabulary shard
    holds the same value after the all-gather; the pmean (a scalar) says so to JAX."""
    total = lax.psum(jnp.sum(per_position), "batch")
    return lax.pmean(total / lax.psum(per_position.size, "batch"), "vocab")


def plain_case(n, c):
    """cross_entropy on (N, C) float32 logits split ("batch", "vocab")."""

    def gathered(logits, labels):
        rows = lax.all_gather(logits, "vocab", axis=1, tiled=True)
        return _mean_over_batch(optax.softmax_cross_entropy_with_integer_labels(rows, labels))

    return dict(
        loss="cross_entropy",
        shape=f"N={n} C={c} float32",
        args=(((n, c), jnp.float32, P("batch", "vocab")),),
        labels=((n,), P("batch")),
        jaxent=jaxent.cross_entropy,
        baseline=gathered,
        argnums=0,
    )


def linear_case(n, d, v):
    """linear_cross_entropy with x (N, D) split over "batch", w (V, D) over "vocab"."""

    def gathered(x, w, labels):
        table = lax.all_gather(w, "vocab", axis=0, tiled=True)
        logits = x @ table.T
        return _mean_over_batch(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return dict(
        loss="linear_cross_entropy",
        shape=f"N={n} D={d} V={v} float32",
        args=(((n, d), jnp.float32, P("batch", None)), ((v, d), jnp.float32, P("vocab", None))),
        labels=((n,), P("batch")),
        jaxent=jaxent.linear_cross_entropy,
        baseline=gathered,
        argnums=(0, 1),
    )


def _mesh(shape, kind=AxisType.Auto, devices=None):
    """A batch x vocab mesh over the first devices (of `devices`, default JAX's)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        shape, AXES, axis_types=(kind, kind), devices=devices[: shape[0] * shape[1]]
    )


def _abstract(case, mesh):
    """ShapeDtypeStructs of the case's arguments, sharded over `mesh`."""
    arrays = [
        jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in case["args"]
    ]
    shape, spec = case["labels"]
    labels = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, spec))
    return (*arrays, labels)


def _specs(case):
    return (*(p for _, _, p in case["args"]), case["labels"][1])


def routes(case) -> dict:
    """Route name -> (mesh axis type, loss, whether it runs inside shard_map)."""
    loss = case["jaxent"]
    found = {
        "shard_map": (AxisType.Auto, lambda *a: loss(*a, **NAMES), True),
        "jit (Auto axes)": (AxisType.Auto, loss, False),
        "jit (Explicit axes)": (AxisType.Explicit, loss, False),
        "baseline": (AxisType.Auto, case["baseline"], True),
    }
    if case["loss"] == "linear_cross_entropy":  # see the README: "lean" suits Auto + data
        lean = functools.partial(loss, implementation="lean")
        found["jit (Auto axes), lean"] = (AxisType.Auto, lean, False)
    return found


def compiled_step(case, mesh_shape, route, devices=None):
    """The compiled forward + backward step of one route."""
    kind, loss, manual = routes(case)[route]
    mesh = _mesh(mesh_shape, kind, devices)
    if manual:
        loss = jax.shard_map(loss, mesh=mesh, in_specs=_specs(case), out_specs=P())
    step = jax.jit(jax.value_and_grad(loss, argnums=case["argnums"]))
    return step.lower(*_abstract(case, mesh)).compile()


def step_collectives(case, mesh_shape, route, devices=None):
    """Collectives of the compiled forward + backward step of one route."""
    return hlo.collectives(compiled_step(case, mesh_shape, route, devices).as_text())


def run(quick: bool, devices=None) -> list[dict]:
    size = "quick" if quick else "full"
    cases = [plain_case(*PLAIN[size]), linear_case(*LINEAR[size])]
    rows = []
    for case in cases:
        for mesh_shape in QUICK_MESHES if quick else MESHES:
            names = ["baseline"] + [r for r in routes(case) if r != "baseline"]
            base = None
            for route in names:
                step = compiled_step(case, mesh_shape, route, devices)
                found = hlo.collectives(step.as_text())
                moved, wire = hlo.total_bytes(found), hlo.wire_bytes(found)
                base = moved if route == "baseline" else base
                rows.append({
                    "loss": case["loss"], "shape": case["shape"],
                    "mesh": f"{mesh_shape[0]}x{mesh_shape[1]}", "route": route,
                    "bytes": moved, "wire_bytes": wire,
                    "largest_all_gather": hlo.largest(found, "all-gather"),
                    "collectives": len(found), "vs_baseline": moved / base if base else None,
                    "temp_bytes": timing.temp_bytes(step),
                })  # fmt: skip
                print(f"{case['loss']:22} {rows[-1]['mesh']:5} {route:22} {_size(moved):>10}")
    return rows


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(rows, env) -> str:
    head = (
        f"Device: {env['device']} · jax {env['jax']} · command: `{env['command']}`\n\n"
        "Communication per device per training step (forward + backward) from the "
        "compiled HLO: `buffers` sums the arrays each collective reduces or gathers, "
        "`sent (ring)` what a ring algorithm sends ((g-1)/g of it, twice for an "
        "all-reduce, over groups of g devices). A collective inside a loop counts once "
        "per iteration. `baseline` all-gathers the logits (cross_entropy) or `w` "
        "(linear_cross_entropy) over the vocabulary axis and runs optax's loss on whole "
        'rows. float32, reduction "mean", default options and implementation unless the '
        "route says. Mesh is batch x vocab. `temp` is the compiled temporary memory of "
        "one device (`memory_analysis()`).\n\n"
    )
    cols = ["loss", "shape", "mesh", "route", "buffers", "sent (ring)", "vs baseline",
            "largest all-gather", "temp"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ratio = "" if r["vs_baseline"] is None else f"{r['vs_baseline']:.3g}"
        cells = [r["loss"], r["shape"], r["mesh"], r["route"], _size(r["bytes"]),
                 _size(r["wire_bytes"]), ratio, _size(r["largest_all_gather"]),
                 "" if r["temp_bytes"] is None else _size(r["temp_bytes"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharding", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes, three meshes")
    p.add_argument("--target", choices=["cpu", *deviceless.EIGHT_DEVICES], default="cpu",
                   help="compile for 8 of these devices without them (default: 8 "
                        "simulated CPU devices)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    quick = " --quick" if args.quick else ""
    if args.target == "cpu":
        if jax.device_count() < 8:
            raise SystemExit(
                "benchmarks.sharding needs 8 devices: set XLA_FLAGS="
                "--xla_force_host_platform_device_count=8 before starting Python, or run "
                "`python -m benchmarks --suite sharding`, which does."
            )
        rows = run(args.quick)
        device = jax.devices()[0]
        label = f"{jax.device_count()} x {device.platform}: {device.device_kind} (simulated)"
        command = "python -m benchmarks --suite sharding" + quick
    else:
        with deviceless.target_devices(args.target, 8) as devices:
            rows = run(args.quick, devices)
        label = f"8 x {devices[0].device_kind} (compile only, deviceless)"
        command = f"python -m benchmarks.sharding --target {args.target}" + quick
    env = {"device": label, "jax": jax.__version__, "command": command}
    folder = "cpu" if args.target == "cpu" else f"{args.target}-deviceless"
    args.out = args.out or Path(__file__).parent / "results" / folder
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharding.json").write_text(json.dumps({"environment": env, "results": rows}))
    (args.out / "sharding.md").write_text(markdown(rows, env))
    print(f"wrote {args.out}/sharding.json, sharding.md")
    return rows


if __name__ == "__main__":
    main()
