"""`python -m benchmarks --quick` runs on CPU and writes a complete, consistent JSON."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--no-torch", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    for key in ("device", "jax", "jaxlib", "command", "shapes", "repeats"):
        assert env[key]
    rows = data["results"]
    suites = {r["suite"] for r in rows}
    assert suites == {"plain", "linear"}
    impls = {r["implementation"] for r in rows}
    assert {"jaxent", "optax", "jaxent default", "jaxent lean"} <= impls
    for r in rows:
        assert r["seconds"] > 0 and r["floor_seconds"] > 0
        assert math.isclose(r["ratio"], r["seconds"] / r["floor_seconds"])
        assert r["loss_rel_err"] < 1e-2 and r["grad_rel_err"] < 5e-2
        assert r["temp_bytes"] is None or r["temp_bytes"] >= 0
    assert (tmp_path / "results.md").read_text().count("\n|") >= len(rows)
    assert (tmp_path / "results.png").stat().st_size > 1000


# A hand-written module: an all-gather in a 5-trip loop, an all-reduce, one over groups
# of one device (moves nothing), a reduce-scatter; the three replica_groups syntaxes.
HLO = """\
HloModule m

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %x = f32[64]{0} get-tuple-element(%p), index=1
  %g = f32[512]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[64])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  %r = (f32[64]{0}, f32[64]{0}) all-reduce(%a, %a), replica_groups=[2,4]<=[8], to_apply=%add
  %one = f32[64]{0} all-reduce(%a), channel_id=3, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}
  %w = (s32[], f32[64]{0}) while(%t0), condition=%cond, body=%body, backend_config={{TRIP}}
  ROOT %s = f32[64]{0} reduce-scatter(%a), channel_id=4, replica_groups=mesh['x'=2,'y'=4] {'y'}
}
"""


def test_hlo_collectives_bytes_counts_and_trivial_groups():
    from benchmarks import hlo

    text = HLO.replace("{{TRIP}}", '{"known_trip_count":{"n":"5"}}')
    found = {c.kind: c for c in hlo.collectives(text)}
    assert set(found) == {"all-gather", "all-reduce", "reduce-scatter"}  # groups of 1 dropped
    assert found["all-gather"] == hlo.Collective("all-gather", 2048, 5, "f32[512]{0}", 8)
    assert found["all-reduce"].group == found["reduce-scatter"].group == 4
    assert found["all-reduce"].bytes == 2 * 64 * 4 and found["all-reduce"].count == 1
    assert found["reduce-scatter"].bytes == 256
    assert hlo.total_bytes(list(found.values())) == 5 * 2048 + 512 + 256
    assert hlo.largest(list(found.values()), "all-gather") == 2048
    ring = 5 * 2048 * 7 / 8 + 512 * 2 * 3 / 4 + 256 * 3 / 4  # (g-1)/g, twice for all-reduce
    assert hlo.wire_bytes(list(found.values())) == ring


def test_hlo_trip_count_from_the_loop_condition():
    """TPU's compiled HLO states no known_trip_count: `i < K` in the condition gives it,
    and a condition of any other form counts the body once."""
    from benchmarks import hlo

    cond = """%cond (p: (s32[], f32[64])) -> pred[] {
  %k = s32[]{:T(128)} constant(7)
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %k), direction=LT
}"""
    old_cond = HLO[HLO.index("%cond") : HLO.index("ENTRY")].strip()
    text = HLO.replace("{{TRIP}}", "{}").replace(old_cond, cond)
    gather = [c for c in hlo.collectives(text) if c.kind == "all-gather"]
    assert [c.count for c in gather] == [7]
    unknown = HLO.replace("{{TRIP}}", "{}")  # condition `constant(true)`: not `i < K`
    assert [c.count for c in hlo.collectives(unknown) if c.kind == "all-gather"] == [1]
    greater = text.replace("direction=LT", "direction=GT")
    assert [c.count for c in hlo.collectives(greater) if c.kind == "all-gather"] == [1]


def test_sharding_suite_measures_the_gathered_logits():
    """One case of `--suite sharding`: the baseline all-gathers the logits (and
    reduce-scatters their gradient); jaxent's vocabulary-parallel loss moves O(N)."""
    from benchmarks import hlo, sharding

    n, c = 256, 1024
    case = sharding.plain_case(n, c)
    baseline = sharding.step_collectives(case, (1, 8), "baseline")
    jaxent_ = sharding.step_collectives(case, (1, 8), "shard_map")
    assert hlo.largest(baseline, "all-gather") == n * c * 4
    assert hlo.largest(jaxent_, "all-gather") == 0
    assert hlo.total_bytes(jaxent_) <= 8 * 4 * n  # a few floats per position


# A hand-written compiled module of a loss on x: f32[8,16]: a reduction reads x; a
# gather behind an elementwise chain reads 8 of its elements; the gradient fusion reads
# x and writes a gradient; a scatter updates that in place; a kernel reads x.
PASSES_HLO = """\
HloModule m

%fused_reduce (p0: f32[8,16]) -> f32[8] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p0, %z), dimensions={1}, to_apply=%add
}

%fused_gather (p0.1: s32[8,2], p1.1: f32[8,16]) -> f32[8] {
  %p0.1 = s32[8,2]{1,0} parameter(0)
  %p1.1 = f32[8,16]{1,0} parameter(1)
  %e = f32[8,16]{1,0} exponential(%p1.1)
  %g = f32[8,1]{1,0} gather(%e, %p0.1), offset_dims={1}, slice_sizes={1,1}
  ROOT %b = f32[8]{0} bitcast(%g)
}

%fused_grad (p0.2: f32[8,16], p1.2: f32[8]) -> f32[8,16] {
  %p0.2 = f32[8,16]{1,0} parameter(0)
  %p1.2 = f32[8]{0} parameter(1)
  %bc = f32[8,16]{1,0} broadcast(%p1.2), dimensions={0}
  ROOT %m = f32[8,16]{1,0} multiply(%p0.2, %bc)
}

%fused_scatter (p0.3: f32[8,16], p1.3: s32[8,2]) -> f32[8,16] {
  %p0.3 = f32[8,16]{1,0} parameter(0)
  %p1.3 = s32[8,2]{1,0} parameter(1)
  %u = f32[8,1]{1,0} constant({...})
  ROOT %s = f32[8,16]{1,0} scatter(%p0.3, %p1.3, %u), update_window_dims={1}, to_apply=%add
}

ENTRY %main (x: f32[8,16], i: s32[8,2]) -> (f32[8,16], f32[8]) {
  %x = f32[8,16]{1,0} parameter(0)
  %i = s32[8,2]{1,0} parameter(1)
  %red = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %lab = f32[8]{0} fusion(%i, %x), kind=kLoop, calls=%fused_gather
  %grad = f32[8,16]{1,0} fusion(%x, %red), kind=kLoop, calls=%fused_grad
  %sc = f32[8,16]{1,0} fusion(%grad, %i), kind=kInput, calls=%fused_scatter
  %k = (f32[8]{0}, f32[8]{0}) custom-call(%x), custom_call_target="kernel"
  ROOT %t = (f32[8,16]{1,0}, f32[8]{0}) tuple(%sc, %lab)
}
"""


def test_hlo_passes_counts_whole_array_reads_and_writes():
    from benchmarks import hlo

    total, lines = hlo.passes(PASSES_HLO, "8,16")
    assert total == 4  # reduce 1 read; grad 1 read + 1 write; kernel 1 read
    assert lines == [
        "fusion red: 1 read, 0 write",
        "fusion grad: 1 read, 1 write",
        "custom-call k: 1 read, 0 write",
    ]
    # the indices are read whole, by the gather (its second operand) and the scatter
    assert hlo.passes(PASSES_HLO, "8,2")[0] == 2


# A hand-written loop over blocks, as XLA:TPU prints it: the body's matmul writes a
# block f32[8,4] to device memory, an asynchronous copy moves it to on-chip memory
# (S(1)) where a reduction reads it, and a bitcast (a transposed view) of a bf16 block
# gradient feeds another matmul; an inner loop negates a block. The entry's arrays of
# the same shape are not counted.
LOOP_HLO = """\
HloModule m

%body (t: (s32[], f32[8,16], f32[8])) -> (s32[], f32[8,16], f32[8]) {
  %t = (s32[], f32[8,16]{1,0}, f32[8]{0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1
  %z = f32[8,4]{0,1:T(8,128)} convolution(%x, %x), dim_labels=bf_io->bf
  %cs = (f32[8,4]{0,1:T(8,128)S(1)}, f32[8,4]{0,1:T(8,128)}, u32[]{:S(2)}) copy-start(%z)
  %cd = f32[8,4]{0,1:T(8,128)S(1)} copy-done(%cs)
  %r = f32[8]{0} fusion(%cd), kind=kInput, calls=%fused_reduce
  %g = bf16[8,4]{1,0} fusion(%x, %r), kind=kOutput, calls=%fused_grad
  %gt = bf16[4,8]{0,1} bitcast(%g)
  %e0 = f32[8,4]{1,0} constant({...})
  %dw = f32[4,16]{1,0} convolution(%gt, %x), dim_labels=bf_io->bf
  %i = s32[] get-tuple-element(%t), index=0
  %c0 = (f32[8,4]{1,0}, s32[]) tuple(%e0, %i)
  %in = (f32[8,4]{1,0}, s32[]) while(%c0), condition=%inner_cond, body=%inner
  ROOT %out = (s32[], f32[8,16]{1,0}, f32[8]{0}) tuple(%i, %x, %r)
}

%inner (u: (f32[8,4], s32[])) -> (f32[8,4], s32[]) {
  %u = (f32[8,4]{1,0}, s32[]) parameter(0)
  %v = f32[8,4]{1,0} get-tuple-element(%u), index=0
  %k = s32[] get-tuple-element(%u), index=1
  %v2 = f32[8,4]{1,0} negate(%v)
  ROOT %u2 = (f32[8,4]{1,0}, s32[]) tuple(%v2, %k)
}

%inner_cond (q: (f32[8,4], s32[])) -> pred[] {
  %q = (f32[8,4]{1,0}, s32[]) parameter(0)
  ROOT %p2 = pred[] constant(true)
}

%cond (c: (s32[], f32[8,16], f32[8])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}, f32[8]{0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: f32[8,16]) -> f32[8,4] {
  %x = f32[8,16]{1,0} parameter(0)
  %e = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_grad
  %zero = s32[] constant(0)
  %r0 = f32[8]{0} constant({...})
  %init = (s32[], f32[8,16]{1,0}, f32[8]{0}) tuple(%zero, %x, %r0)
  %w = (s32[], f32[8,16]{1,0}, f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %e2 = f32[8,4]{1,0} negate(%e)
}
"""


def test_hlo_loop_passes_counts_one_iteration_in_device_memory():
    from benchmarks import hlo

    total, moved, lines = hlo.loop_passes(LOOP_HLO, "8,4")
    assert lines == [
        "body: convolution z: 0 read, 1 write",  # f32 to device memory
        "body: copy-start cs: 1 read, 0 write",  # its destination is on chip
        "body: fusion g: 0 read, 1 write",  # the reduction read the on-chip copy
        "body: convolution dw: 1 read, 0 write",  # through the transposed view
        "inner: negate v2: 1 read, 1 write",  # a loop in the loop: its own body, once
    ]
    assert total == 6 and moved == 32 * (4 + 4 + 2 + 2 + 4 + 4)


# Two entries in the forms Triton writes for sm_90a (hand-written, shortened): a
# warpgroup-MMA kernel fed by 16-byte cp.async copies, and a predicated 16-byte load.
PTX = """
.version 8.4
.target sm_90a
.visible .entry jaxent_dot(
	.param .u64 jaxent_dot_param_0
)
.reqntid 256, 1, 1
{
	cp.async.cg.shared.global [ %r11 + 0 ], [ %rd14 + 0 ], 0x10, %r12;
	cp.async.commit_group;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, %p1, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd3, %rd4, %p1, 1, 1, 0, 1;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f3}, {%r1}, {%r2}, {%f4};
	st.global.v2.b32 [ %rd5 + 0 ], { %r3, %r4 };
	ret;
}
.visible .entry loop_add_fusion(
	.param .u64 loop_add_fusion_param_0
)
{
	mov.u32 %r10, 0; @%p1 ld.global.L1::evict_last.v4.b32 {%r10, %r11, %r12, %r13}, [%rd12];
	st.global.b16 [ %rd6 + 0 ], %rs1;
	ret;
}
"""


def test_ptx_reads_matrix_instructions_and_access_widths(tmp_path):
    from benchmarks import ptx

    found = ptx.kernels(PTX)
    assert set(found) == {"jaxent_dot", "loop_add_fusion"}
    dot = found["jaxent_dot"]
    assert dot["mma"] == {"wgmma.mma_async m64n64k16": 2, "mma.sync m16n8k16": 1}
    assert (dot["load_bytes"], dot["store_bytes"], dot["threads"]) == (16, 8, 256)
    fusion = found["loop_add_fusion"]
    assert fusion["mma"] == {} and fusion["threads"] is None
    assert (fusion["load_bytes"], fusion["store_bytes"]) == (16, 2)
    (tmp_path / "module.ptx").write_text(PTX)
    assert list(ptx.read_dump(tmp_path)) == ["jaxent_dot"]  # XLA's own fusions left out
    assert ptx.describe(dot) == ("mma.sync m16n8k16 ×1, wgmma.mma_async m64n64k16 ×2; "
                                 "loads 16 B, stores 8 B; 256 threads")  # fmt: skip


def test_hlo_reduce_scatter_counts_the_array_before_scattering():
    """A reduce-scatter's result is 1/group of its operand: the bytes counted are the
    operand's (64 floats), not the result's (16)."""
    from benchmarks import hlo

    text = """HloModule m

ENTRY %main (a: f32[64]) -> f32[16] {
  %a = f32[64]{0} parameter(0)
  ROOT %s = f32[16]{0} reduce-scatter(%a), replica_groups={{0,1,2,3}}, dimensions={0}, ARGS
}""".replace("ARGS", "channel_id=4, to_apply=%add")
    (found,) = hlo.collectives(text)
    assert (found.kind, found.bytes, found.group) == ("reduce-scatter", 64 * 4, 4)


def test_memory_table_is_a_share_of_the_float32_logits(monkeypatch):
    """`benchmarks.memory` on a tiny head: the materialised path's compiled temp holds
    at least the (N, V) float32 logits, and `of_f32_logits` is temp / (4 N V)."""
    from benchmarks import memory

    monkeypatch.setattr(memory, "HEADS", {"tiny": (16, 256)})
    (row,) = memory.run(tokens=(32,), implementations=("xla",))
    assert (row["N"], row["D"], row["V"], row["dtype"]) == (32, 16, 256, "float32")
    assert row["temp_bytes"] >= 4 * 32 * 256
    assert row["of_f32_logits"] == row["temp_bytes"] / (4 * 32 * 256)


def test_peak_extra_bytes_is_the_new_peak_above_what_was_in_use(monkeypatch):
    """Device memory stats before and after the run: 100 B in use, the peak rising
    from 500 to 900 B, is 800 B taken by the run; a peak that did not rise (JAX
    cannot reset it) and a CPU without stats are None."""
    from benchmarks import timing

    def stats(*pairs):
        seen = iter([{"bytes_in_use": a, "peak_bytes_in_use": b} for a, b in pairs])
        monkeypatch.setattr(timing, "_memory_stats", lambda: next(seen))

    stats((100, 500), (100, 900))
    assert timing.peak_extra_bytes(lambda: None) == 800
    stats((100, 900), (100, 900))
    assert timing.peak_extra_bytes(lambda: None) is None
    monkeypatch.setattr(timing, "_memory_stats", dict)
    assert timing.peak_extra_bytes(lambda: None) is None


def test_subprocess_rows_get_the_floor_of_their_case():
    """`cli.attach_floors`: a torch row (measured in another process) takes the floor
    of the same suite, dtype and shape measured here; its ratio is its time / floor."""
    from benchmarks.cli import attach_floors

    here = [
        {"suite": "plain", "N": 8, "C": 4, "dtype": "float32", "floor_seconds": 2.0},
        {"suite": "plain", "N": 8, "C": 4, "dtype": "bfloat16", "floor_seconds": 1.0},
        {"suite": "linear", "N": 8, "D": 2, "V": 4, "dtype": "float32", "floor_seconds": 5.0},
    ]
    extra = [
        {"suite": "plain", "N": 8, "C": 4, "dtype": "float32", "seconds": 6.0},
        {"suite": "linear", "N": 8, "D": 2, "V": 4, "dtype": "float32", "seconds": 10.0},
    ]
    got = [(r["floor_seconds"], r["ratio"]) for r in attach_floors(extra, here)]
    assert got == [(2.0, 3.0), (5.0, 2.0)]


def test_plain_errors_are_measured_against_a_more_precise_reference():
    """`benchmarks.plain` with bfloat16 inputs and a float32 reference: the naive bf16
    loss and gradients show their rounding (a bf16 reference would show 0)."""
    import jax.numpy as jnp

    from benchmarks import plain

    rows = plain.run((64, 100, "bfloat16"), 1, jnp.float32)
    (naive,) = [r for r in rows if r["implementation"] == "naive jnp"]
    assert 1e-5 < naive["loss_rel_err"] < 1e-2 and 1e-4 < naive["grad_rel_err"] < 5e-2
