"""What the PTX of a compiled Pallas/Triton kernel says about how it will run: which
matrix instructions its dots became and how wide its memory accesses are.

Used by `python -m benchmarks.deviceless` (target h100), which has XLA dump the PTX
it generates for sm_90a (`--xla_dump_to`) without a GPU. Two facts matter for the
kernels' speed and can be read before any GPU time:

- matrix units: Hopper's tensor cores are fed at full rate by warpgroup MMAs
  (`wgmma.mma_async`, sm_90a); `mma.sync` is the older per-warp form (Ampere's), which
  reaches only part of an H100's tensor throughput. A dot that became neither runs on
  the CUDA cores (float32 inputs at `Precision.HIGHEST` do, on purpose).
- memory width: a bandwidth-bound kernel needs 16-byte accesses per thread
  (`ld.global.v4.b32`, or `cp.async` of 16 bytes into shared memory for a dot's
  operands); narrower ones take more instructions per byte.
"""

from __future__ import annotations

import re
from pathlib import Path

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)")
# A matrix instruction and its shape, e.g. wgmma.mma_async.sync.aligned.m64n64k16.f32...
_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\S*?\.(m\d+n\d+k\d+)")
# Vector count and element width of a global access: ld.global[.mods][.v4].b32
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*?)\.[bfsu](8|16|32|64)\b")
# cp.async.{ca,cg}.shared.global [dst], [src], BYTES
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(\w+)")
_THREADS = re.compile(r"\.reqntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?")


def _bytes(mods: str, bits: str) -> int:
    vector = re.search(r"\.v(\d)", mods)
    return (int(vector.group(1)) if vector else 1) * int(bits) // 8


def kernels(text: str) -> dict[str, dict]:
    """Per `.entry` of PTX `text`: its matrix instructions ({"wgmma.mma_async m64n64k16":
    count}), the widest global load and store in bytes per thread (`cp.async` copies
    count as loads), and its threads per block (None where the entry does not say)."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(text)]
    found = {}
    for i, (start, name) in enumerate(starts):
        body = text[start : starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        mma: dict[str, int] = {}
        for kind, shape in _MMA.findall(body):
            mma[f"{kind} {shape}"] = mma.get(f"{kind} {shape}", 0) + 1
        widest = {"ld": 0, "st": 0}
        for op, mods, bits in _ACCESS.findall(body):
            widest[op] = max(widest[op], _bytes(mods, bits))
        for size in _CP_ASYNC.findall(body):
            widest["ld"] = max(widest["ld"], int(size, 0))
        threads = _THREADS.search(body)
        found[name] = {
            "mma": mma,
            "load_bytes": widest["ld"],
            "store_bytes": widest["st"],
            "threads": None if threads is None
            else int(threads.group(1)) * int(threads.group(2) or 1) * int(threads.group(3) or 1),
        }  # fmt: skip
    return found


def read_dump(directory: Path, prefix: str = "jaxent_") -> dict[str, dict]:
    """`kernels()` of every PTX file XLA dumped under `directory`, the entries whose
    name starts with `prefix` (jaxent's kernels; XLA's own fusions are left out)."""
    found = {}
    for path in sorted(Path(directory).glob("*.ptx")):
        found.update({k: v for k, v in kernels(path.read_text()).items() if k.startswith(prefix)})
    return found


def describe(summary: dict) -> str:
    """One table cell: "wgmma.mma_async m64n64k16 ×4; loads 16 B, stores 16 B; 256 threads"."""
    mma = ", ".join(f"{k} ×{n}" for k, n in sorted(summary["mma"].items())) or "no MMA"
    threads = f"; {summary['threads']} threads" if summary["threads"] else ""
    return (f"{mma}; loads {summary['load_bytes']} B, stores {summary['store_bytes']} B"
            f"{threads}")  # fmt: skip
