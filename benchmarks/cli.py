"""`python -m benchmarks`: run the suites, print a table, write results/<device>/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from . import linear, plain, report, shapes


def environment(argv) -> dict:
    import jaxlib
    import optax

    device = jax.devices()[0]
    env = {
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": "python -m benchmarks " + " ".join(argv),
    }
    if device.platform == "gpu":
        try:
            smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(smi, capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    return env


def torch_rows(plain_cases, linear_cases, repeats) -> list[dict]:
    """PyTorch baselines in a subprocess; [] (with the child's notice) when unavailable."""
    request = json.dumps({"plain": plain_cases, "linear": linear_cases, "repeats": repeats})
    child = subprocess.run([sys.executable, "-m", "benchmarks.torch_baselines"], input=request,
                           capture_output=True, text=True)  # fmt: skip
    if child.stderr.strip():
        print(child.stderr.strip())
    try:
        return json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return []


def attach_floors(extra, rows):
    """Give subprocess rows the floor of the same case measured here."""
    for r in extra:
        keys = ("N", "C") if r["suite"] == "plain" else ("N", "D", "V")
        for base in rows:
            if (
                base["suite"] == r["suite"]
                and base["dtype"] == r["dtype"]
                and all(base.get(k) == r.get(k) for k in keys)
            ):
                r["floor_seconds"] = base["floor_seconds"]
                r["ratio"] = r["seconds"] / base["floor_seconds"]
                break
    return extra


def run_sharding(args) -> dict:
    """The sharding suite needs 8 host devices, which XLA_FLAGS must request before JAX
    starts: run it in a subprocess with the flag set."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    out = args.out or Path(__file__).parent / "results" / "cpu"
    cmd = [sys.executable, "-m", "benchmarks.sharding", "--out", str(out)]
    cmd += ["--quick"] if args.quick else []
    subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads((out / "sharding.json").read_text())


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument(
        "--suite",
        choices=["plain", "linear", "all", "sharding"],
        default="all",
        help="all = plain + linear; sharding = communication volume on 8 simulated CPU devices",
    )
    p.add_argument(
        "--shapes",
        choices=shapes.NAMES,
        default=None,
        help="named shape set (default: cpu on CPU, gpu elsewhere)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (CI)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="override every case's dtype"
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.suite == "sharding":
        return run_sharding(args)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:  # float64 references on CPU
        jax.config.update("jax_enable_x64", True)
    name = "quick" if args.quick else args.shapes or ("cpu" if on_cpu else "gpu")
    repeats = args.repeats or (3 if args.quick else 10)
    ref_dtype = jnp.float64 if on_cpu else jnp.float32
    cases = {
        "plain": list(shapes.PLAIN[name]) if args.suite in ("plain", "all") else [],
        "linear": list(shapes.LINEAR[name]) if args.suite in ("linear", "all") else [],
    }
    if args.dtype:
        cases = {k: [(*c[:-1], args.dtype) for c in v] for k, v in cases.items()}
    env = environment(argv)
    env.update({"shapes": name, "repeats": repeats})
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].split(": ")[-1].lower()).strip("-")
    out = args.out or Path(__file__).parent / "results" / ("cpu" if on_cpu else slug)
    rows = []
    work = [("plain", c) for c in cases["plain"]] + [("linear", c) for c in cases["linear"]]
    for suite, case in tqdm(work, desc="benchmarks"):
        module = plain if suite == "plain" else linear
        rows += module.run(case, repeats, ref_dtype)
        report.write_json(rows, {**env, "complete": False}, out)  # kept if a later case dies
    if not args.no_torch:
        rows += attach_floors(torch_rows(cases["plain"], cases["linear"], repeats), rows)
    print(report.terminal(rows))
    report.write(rows, {**env, "complete": True}, out)
    print(f"wrote {out}/results.json, results.md, results.png")
    return {"environment": env, "results": rows}
