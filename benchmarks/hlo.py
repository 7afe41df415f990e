"""Collectives of a compiled XLA program, read from its HLO text.

`collectives(compiled.as_text())` lists every cross-device operation (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute, and their async -start
forms) with the bytes it moves per device and how many times it runs per call:
a collective inside a `while` body (a `lax.scan`) runs once per iteration, so it
is counted with the loop's known trip count. Per-operation bytes are the larger of
its operands' and its results' sizes — for an all-gather the gathered array, for a
reduce-scatter the array before scattering — so an all-gather of the logits shows
up as a logits-sized number. A collective whose replica groups hold one device each
(a `psum` over a mesh axis of size 1) moves nothing and is left out.

This is a measurement tool for tests and benchmarks, not part of the library.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations|true_computation|"
                    r"false_computation)=(?:\{([^}]*)\}|%?([\w.\-]+))")  # fmt: skip
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_GROUPS_LISTED = re.compile(r"replica_groups=\{\{([\d,]*)\}")  # {{0,1},{2,3}}
_GROUPS_IOTA = re.compile(r"replica_groups=\[[\d,]*?(\d+)\]<=")  # [4,2]<=[8]
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")  # mesh['a'=2] {'a'}


def group_size(rest: str) -> int | None:
    """Devices per replica group of a collective (None when the HLO does not say)."""
    listed = _GROUPS_LISTED.search(rest)
    if listed:
        return len(listed.group(1).split(","))
    iota = _GROUPS_IOTA.search(rest)
    if iota:
        return int(iota.group(1))
    mesh = _GROUPS_MESH.search(rest)
    if mesh:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    return None


class Collective(NamedTuple):
    kind: str  # one of KINDS
    bytes: int  # per device, per execution
    count: int  # executions per call of the program (loop trip counts applied)
    shape: str  # the result type as printed in the HLO
    group: int | None = None  # devices per replica group, when the HLO says


def shape_bytes(text: str) -> int:
    """Bytes of every array type in `text` (a shape or a tuple of shapes)."""
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _ARRAY.findall(text))  # fmt: skip


def _parse(hlo: str):
    """(computation -> its instructions (name, type, opcode, rest of line), entry name)."""
    comps, current, entry = {}, None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            comps[current] = []
            entry = current if line.startswith("ENTRY") else entry
            continue
        inst = _INSTRUCTION.match(line)
        if inst and current is not None:
            comps[current].append(inst.groups())
    return comps, entry


def _trip_count(comps, rest: str) -> int:
    """Iterations of a `while` (its text after the opcode): XLA's known_trip_count when
    the HLO states it (GPU and CPU do); else read off its condition when that is
    `i < K` for a constant K, as JAX's scan and fori_loop compile to, counting from 0
    (TPU's compiled HLO states no trip count); else 1, which can only under-count."""
    found = _TRIP.search(rest)
    if found:
        return int(found.group(1))
    cond = _CONDITION.search(rest)
    insts = comps.get(cond.group(1), []) if cond else []
    constants = {name: r.split(")", 1)[0] for name, _, op, r in insts if op == "constant"}
    for _, _, opcode, r in insts:
        if opcode == "compare" and "direction=LT" in r:
            bound = [constants.get(o) for o in _OPERANDS.findall(r.split(")", 1)[0])]
            if len(bound) == 2 and bound[0] is None and (bound[1] or "").isdigit():
                return int(bound[1])
    return 1


def _multiplicities(comps, entry) -> dict:
    """How many times each computation runs per call: while bodies run trip-count times;
    every other called computation (fusions, branches, reducers) as often as its caller.
    A branch is counted as if taken, which can only over-count."""
    callers = {}  # callee -> [(caller, times per caller run)]
    for comp, insts in comps.items():
        for _, _, opcode, rest in insts:
            trip = _trip_count(comps, rest) if opcode == "while" else 1
            for listed, single in _CALLS.findall(rest):
                for callee in (c.strip().lstrip("%") for c in (listed or single).split(",")):
                    callers.setdefault(callee, []).append((comp, trip))
    runs = {entry: 1}

    def count(comp):
        if comp not in runs:
            runs[comp] = 0  # guards against cycles, which HLO does not have
            runs[comp] = sum(count(caller) * trip for caller, trip in callers.get(comp, ()))
        return runs[comp]

    for comp in comps:
        count(comp)
    return runs


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled module's HLO text (`compiled.as_text()`)."""
    comps, entry = _parse(hlo)
    runs = _multiplicities(comps, entry)
    types = {name: typ for insts in comps.values() for name, typ, _, _ in insts}
    found = []
    for comp, insts in comps.items():
        for _, typ, opcode, rest in insts:
            kind = opcode.removesuffix("-start")
            if kind not in KINDS or group_size(rest) == 1:  # groups of one move nothing
                continue
            operands = _OPERANDS.findall(rest.split(")", 1)[0])
            size = max(shape_bytes(typ), sum(shape_bytes(types.get(o, "")) for o in operands))
            found.append(Collective(kind, size, runs.get(comp, 1), typ, group_size(rest)))
    return found


def total_bytes(found: list[Collective]) -> int:
    """Bytes moved per device per call: Σ bytes × executions."""
    return sum(c.bytes * c.count for c in found)


def wire_bytes(found: list[Collective]) -> float:
    """Bytes each device sends per call with ring algorithms over groups of g devices:
    an all-reduce sends 2 (g-1)/g of its array, an all-gather, reduce-scatter or
    all-to-all (g-1)/g of the whole array, a collective-permute all of it."""

    def share(c):
        if c.kind == "collective-permute" or c.group is None:
            return 1.0
        part = (c.group - 1) / c.group
        return 2 * part if c.kind == "all-reduce" else part

    return sum(c.bytes * c.count * share(c) for c in found)


def largest(found: list[Collective], kind: str | None = None) -> int:
    """The largest single collective (of one kind, if given), in bytes; 0 if none."""
    return max((c.bytes for c in found if kind in (None, c.kind)), default=0)


# Instructions that move no data (views, tuples, constants).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
# Fused uses of an array that touch only a few of its elements.
_PARTIAL = {"gather", "slice", "dynamic-slice"}
# Fused ops that update their first operand in place (XLA aliases it with the output).
_IN_PLACE = {"scatter", "dynamic-update-slice"}


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _elements(typ: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _ARRAY.findall(typ))


def _use(body, index: int) -> str:
    """How a fused computation uses its parameter `index`: "full" (read whole),
    "partial" (only gathered or sliced) or "in place" (updated where it lies).

    Elementwise ops in a fusion are evaluated where their consumers need them, so an
    operand reaches memory as its furthest consumers do: an elementwise chain (ops with
    as many elements) ending in a gather reads a few elements, one ending in a
    reduction or the fusion's output reads all."""
    param = next(n for n, _, op, rest in body if op == "parameter" and
                 int(rest.split(")")[0]) == index)  # fmt: skip
    types = {n: typ for n, typ, _, _ in body}
    root = body[-1][0]  # the printer puts ROOT last
    size = _elements(types[param])
    uses, todo = set(), [param]
    while todo:
        name = todo.pop()
        users = [(n, op, _operands(rest)) for n, _, op, rest in body if name in _operands(rest)]
        if not users or name == root:
            uses.add("full")
        for user, op, args in users:
            if op in _PARTIAL and args[0] == name:
                uses.add("partial")
            elif op in _IN_PLACE and args[0] == name:
                uses.add("in place")
            elif op != "tuple" and _elements(types[user]) == size:
                todo.append(user)  # elementwise: follow it to its consumers
            else:
                uses.add("full")
    return uses.pop() if len(uses) == 1 else "full"


_SPACE = re.compile(r":[^}]*S\((\d+)\)")


def _in_memory(typ: str) -> bool:
    """Whether an array type lives in device memory: XLA:TPU marks arrays it places in
    on-chip memory with a memory space S(1) or above in their layout."""
    space = _SPACE.search(typ)
    return space is None or space.group(1) == "0"


def _array_traffic(comps, comp, pattern):
    """(reads + writes, bytes moved, lines) of whole arrays matching `pattern` in device
    memory by the instructions of computation `comp` (not descending into the
    computations it calls). A bitcast of such an array (a transposed view) is one; an
    asynchronous copy reads its source at its start and writes its destination at its
    end, each only where that is in device memory."""
    types = {name: typ for name, typ, _, _ in comps[comp]}
    matching = {name for name, typ in types.items() if pattern in typ}
    for name, _, opcode, rest in comps[comp]:
        if opcode == "bitcast" and _operands(rest)[:1] and _operands(rest)[0] in matching:
            matching.add(name)
    total = moved = 0
    lines = []
    for name, typ, opcode, rest in comps[comp]:
        if opcode in _FREE or opcode == "while":  # a loop's body is counted as its own
            continue
        called = _CALLS.search(rest) if opcode == "fusion" else None
        body = comps.get(called.group(2)) if called else None
        reads = writes = read_bytes = 0
        in_place = False
        for i, operand in enumerate(_operands(rest) if opcode != "copy-done" else ()):
            if operand not in matching or not _in_memory(types[operand]):
                continue
            use = _use(body, i) if body else "full"
            if use == "full":
                reads += 1
                read_bytes += shape_bytes(types[operand])
            in_place |= use == "in place"
        outputs = [t for t in re.split(r",\s*(?=[a-z]+\d*\[)", typ) if pattern in t]
        outputs = [] if opcode == "copy-start" else [t for t in outputs if _in_memory(t)]
        outputs = outputs[in_place:]
        writes = len(outputs)
        if reads or writes:
            total += reads + writes
            moved += read_bytes + sum(map(shape_bytes, outputs))
            lines.append(f"{opcode} {name}: {reads} read, {writes} write")
    return total, moved, lines


def passes(hlo: str, dims: str) -> tuple[int, list[str]]:
    """Whole-array reads and writes of arrays of shape `dims` ("8192,128256") by the
    entry computation of a compiled module, and a line per instruction that makes any.

    The memory traffic of a bandwidth-bound loss in units of the array: one read and
    one write is the floor (2). A fusion operand only gathered or sliced is not a read
    (a label-logit gather touches N elements); an operand a fused scatter or
    dynamic-update-slice updates in place is neither read nor written whole. Arrays
    count whatever their dtype (a float32 copy of bfloat16 logits moves twice their
    bytes). Loops are not descended into: this is for straight-line programs such as
    the plain losses (`loop_passes` is for loops over blocks)."""
    comps, entry = _parse(hlo)
    total, _, lines = _array_traffic(comps, entry, f"[{dims}]")
    return total, lines


_BODY = re.compile(r"body=%?([\w.\-]+)")


def loop_passes(hlo: str, dims: str) -> tuple[int, int, list[str]]:
    """`passes` of block-shaped arrays (`dims`, e.g. "8192,768": one vocabulary block's
    logits) in one iteration of each loop body of a compiled module (bodies of loops
    inside loops included), summed: the traffic per block of a loop over blocks
    (`linear_cross_entropy`'s "lean" and "pallas", whose forward and backward are one
    loop each). Returns (passes, bytes moved, lines); an iteration is taken to be one
    block (XLA:TPU does not print trip counts to check an unrolled loop against)."""
    comps, entry = _parse(hlo)
    bodies, todo = [], [entry]
    while todo:
        for _, _, opcode, rest in comps[todo.pop()]:
            found = _BODY.search(rest) if opcode == "while" else None
            if found and found.group(1) in comps:
                bodies.append(found.group(1))
                todo.append(found.group(1))
    total = moved = 0
    lines = []
    for body in bodies:
        t, m, body_lines = _array_traffic(comps, body, f"[{dims}]")
        total, moved = total + t, moved + m
        lines += [f"{body}: {line}" for line in body_lines]
    return total, moved, lines
