"""Compiled temp memory of `linear_cross_entropy` at the language-model head shapes.

    python -m benchmarks.memory [--out DIR] [--tokens 8192 32768] [--implementations ...]

Compile only (shapes, no arrays), so it runs at full size on any machine: forward +
backward of the mean loss w.r.t. x and w, for N = 8192 and 32768 tokens, with the
block sizes jaxent picks on the accelerator for bfloat16 inputs (`chunked_blocks`,
`default_vocab_block_size`; a GPU's when run on CPU), as
`memory_analysis().temp_size_in_bytes`.

On a GPU the inputs are bfloat16. On CPU they are float32: XLA:CPU has no bfloat16
matmul and hoists a float32 conversion of all of `w` out of the block loops, a
CPU-only temp that would hide what the loss itself holds; float32 inputs are the
closer proxy of the GPU's buffers (the float32 logits, dx and dw accumulators are
float32 either way; "chunked"'s block gradient, bfloat16 on the GPU, is float32 here,
so the proxy overstates it). Writes memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

import jaxent
from jaxent.linear.api import default_block_size, default_sub_block, default_vocab_block_size

HEADS = {"Llama-3": (4096, 128256), "Gemma-2": (2304, 256000)}
TOKENS = (8192, 32768)


def temp_bytes(impl, n, d, v, dtype, block, sharding=None) -> int:
    """Compiled temp of forward + backward; `sharding` places the (shape-only) inputs,
    e.g. on a compile-only GPU (`benchmarks.deviceless`)."""

    def loss(x, w, y):
        return jaxent.linear_cross_entropy(x, w, y, implementation=impl, block_size=block)

    args = (
        jax.ShapeDtypeStruct((n, d), dtype, sharding=sharding),
        jax.ShapeDtypeStruct((v, d), dtype, sharding=sharding),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


IMPLEMENTATIONS = ("chunked", "lean", "pallas", "xla")  # "pallas": GPUs and TPUs


def chunked_blocks(n: int, v: int, backend: str = "gpu", itemsize: int = 2) -> tuple[int, int]:
    """What "chunked" picks on `backend` for bfloat16 inputs: (tokens per block, per
    sub-block). With `itemsize` 4 (the CPU proxy's float32 inputs) the block stays
    whole, as for any float32 matmul: its gradient then overwrites its logits, where
    sub-blocks would add a float32 buffer that the bfloat16 run does not have."""
    block = default_block_size(n, v, backend, itemsize=2)
    return block, default_sub_block(block, v, backend, itemsize=itemsize)


def run(tokens=TOKENS, implementations=IMPLEMENTATIONS, sharding=None) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    backend = "gpu" if on_cpu else jax.default_backend()
    rows = []
    for head, (d, v) in HEADS.items():
        for n in tokens:
            blocks = {
                "chunked (default)": chunked_blocks(n, v, backend, jnp.dtype(dtype).itemsize),
                "lean": default_vocab_block_size(n, v, backend),
                "pallas": default_vocab_block_size(n, v, backend),
                "xla": None,
            }
            for impl, block in blocks.items():
                name = impl.split()[0]
                if name not in implementations:
                    continue
                try:
                    temp = temp_bytes(name, n, d, v, dtype, block, sharding)
                except (NotImplementedError, jax.errors.JaxRuntimeError) as err:
                    # "pallas" on CPU; a program larger than the device's memory
                    print(f"  {head} N={n} {impl}: skipped ({str(err)[:120]})")
                    continue
                rows.append({"head": head, "N": n, "D": d, "V": v, "dtype": jnp.dtype(dtype).name,
                             "implementation": impl, "block_size": block, "temp_bytes": temp,
                             "of_f32_logits": temp / (4 * n * v)})  # fmt: skip
    return rows


def block_label(block) -> str:
    """A `block_size` as printed: 2048, or 2048/512 for (tokens per block, per sub-block)."""
    if block is None:
        return ""
    return "/".join(map(str, block)) if isinstance(block, tuple | list) else str(block)


def markdown(rows, device) -> str:
    lines = [
        f"Compiled temp of forward + backward, `python -m benchmarks.memory` on {device}.",
        "",
        "| head | N | dtype | implementation | block | temp MiB | of f32 logits | vs smallest N |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in rows:
        key = (r["head"], r["implementation"])
        first.setdefault(key, r["temp_bytes"])
        lines.append(
            f"| {r['head']} | {r['N']} | {r['dtype']} | {r['implementation']} | "
            f"{block_label(r['block_size'])} | {r['temp_bytes'] / 2**20:.0f} | "
            f"{100 * r['of_f32_logits']:.1f}% | {r['temp_bytes'] / first[key]:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS)
    )
    args = p.parse_args(argv)
    device = jax.devices()[0]
    label = f"{device.platform}: {device.device_kind}, jax {jax.__version__}"
    rows = run(args.tokens, args.implementations)
    text = markdown(rows, label)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.md").write_text(text)
        (args.out / "memory.json").write_text(json.dumps({"device": label, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
