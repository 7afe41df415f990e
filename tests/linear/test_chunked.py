"""Memory of the fused implementations, from the compiled program (deterministic).

D=256, V=32000, float32: the (N, V) logits alone are N * V * 4 bytes.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import jaxent
from jaxent.linear.api import (
    default_block_size,
    default_sub_block,
    default_vocab_block_size,
    dividing_block,
    vocab_group,
)

D, V = 256, 32000


def temp_bytes(impl, n, grad=True, d=D, v=V, block_size=None):
    def loss(x, w, y):
        return jaxent.linear_cross_entropy(x, w, y, implementation=impl, block_size=block_size)

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if grad else loss
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        pytest.skip("memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def test_default_memory_bounds_on_cpu():
    logits_bytes = 8192 * V * 4
    small, large = temp_bytes(None, 2048), temp_bytes(None, 8192)
    assert large <= 0.25 * logits_bytes
    assert large <= 1.5 * small
    xla_small, xla_large = temp_bytes("xla", 2048), temp_bytes("xla", 8192)
    assert xla_large >= 3.5 * xla_small  # the materialised path grows with N * V
    assert large < xla_large / 10


def test_lean_never_holds_a_float32_copy_of_w():
    assert temp_bytes("lean", 8192) < V * D * 4


@pytest.mark.parametrize("block_size", [None, 1024])
def test_lean_uses_w_in_place_for_an_awkward_vocabulary(block_size):
    """V = 6012 = 2^2 * 3^2 * 167 (like Llama-3's 128256 = 2^8 * 3 * 167) is a multiple of
    no power-of-two block: "lean" picks a block dividing V, so `w` is viewed as blocks
    in place. Doubling D then grows the temp by one block of w and the dx accumulator
    (N x D), less than the bytes `w` gains — a padded copy of w would grow it by more."""
    n, v = 512, 6012
    grown = temp_bytes("lean", n, d=512, v=v, block_size=block_size) - temp_bytes(
        "lean", n, d=256, v=v, block_size=block_size
    )
    assert grown < 0.75 * v * 256 * 4


def test_dividing_block():
    """Blocks divide V (no padded copy of w) and, by preference, their runs of `group`
    classes come in multiples of 8 (w split over up to 8 devices splits every block)."""
    # 128256 = 2^8 x 3 x 167: 2004 divides it, but 1336 = 8 x 167 is the largest
    # multiple of 8 in [1024, 2048] that does.
    assert dividing_block(128256, 2048) == default_vocab_block_size(8192, 128256, "gpu") == 1336
    assert dividing_block(128256, 512) == 384  # N=32768 (501 divides V, but is odd)
    assert dividing_block(256000, 2048) == 2048
    assert dividing_block(131071, 2048) == 2048  # prime: nothing divides it, V is padded
    assert dividing_block(203, 8192) == 203
    assert dividing_block(1000, 250) == 200  # 250 would be 250 runs
    assert dividing_block(15, 10) == 5  # the range [block/2, block] includes its lower end
    # A TPU's blocks are made of runs of 8 classes: 768 = 96 runs of 8, from [512, 2048]
    # as [1024, 2048] has no divisor of V that 64 divides (1336 is 167 runs).
    assert dividing_block(128256, 2048, multiple=8) == 768
    assert default_vocab_block_size(8192, 128256, "tpu") == 768
    assert dividing_block(208, 16, multiple=4) == 16  # no shardable runs: runs of 4 kept
    assert dividing_block(203, 32, multiple=8) == 29  # no multiple of 8 divides 203
    assert (vocab_group(768, "tpu"), vocab_group(2004, "tpu"), vocab_group(29, "tpu")) == (8, 4, 1)
    assert vocab_group(2048, "gpu") == vocab_group(2048, "cpu") == 1


def test_forward_only_does_no_gradient_work():
    # A forward pass holds no dw accumulator (V x D float32) and no per-block gradient.
    forward = temp_bytes("chunked", 8192, grad=False)
    assert forward + V * D * 4 <= temp_bytes("chunked", 8192)


def _computations(hlo: str) -> dict[str, str]:
    """A compiled module's computations by name (HLO text: blank-line separated)."""
    found = {}
    for block in hlo.split("\n\n"):
        header = re.search(r"^(?:ENTRY )?%([\w.\-]+)", block.strip())
        if header:
            found[header.group(1)] = block
    return found


def _inside_loops(comps: dict[str, str]) -> set[str]:
    """The computations a while loop's body runs, directly or through calls."""
    called = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
    todo = [b for text in comps.values() for b in re.findall(r"body=%([\w.\-]+)", text)]
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in comps:
            seen.add(name)
            todo += called.findall(comps[name])
    return seen


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_fills_its_gradient_buffer_once_not_per_block(reduction):
    """Each block's logit gradient is formed into the buffer the previous block used:
    the zeros it starts from are written once, outside the loop over blocks (a buffer
    made per block would be filled in every iteration, a pass over it)."""
    n, d, v = 1024, 64, 1000

    def loss(x, w, y):
        rows = jaxent.linear_cross_entropy(
            x, w, y, implementation="chunked", block_size=(256, 128), reduction=reduction
        )
        return jnp.sum(rows)

    shapes = [((n, d), jnp.float32), ((v, d), jnp.float32), ((n,), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, t) for s, t in shapes]
    comps = _computations(jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().as_text())
    fills = {  # computations whose result is a broadcast of the buffer's shape
        name
        for name, text in comps.items()
        if re.search(rf"ROOT \S+ = f32\[2,128,{v}\]\S* broadcast\(", text)
    }
    callers = {name for name, text in comps.items() for f in fills if f"calls=%{f}," in text}
    assert fills and callers and not callers & _inside_loops(comps)


def test_default_block_size():
    # The largest power of two whose float32 logits fit CPU's 16 MiB: not half of it
    # (halving it made the CPU default 1.5x slower than "xla" at N=2048).
    block = default_block_size(10_000, 32000, "cpu")
    assert block * 32000 * 4 <= 16 << 20 < 2 * block * 32000 * 4
    assert default_block_size(3, 32000, "cpu") == 8
    # No larger than the batch needs: a power-of-two batch is one block, not two halves.
    assert [default_block_size(n, 32000, "cpu") for n in (16, 17, 64)] == [16, 32, 64]
    assert default_block_size(100_000, 128256, "gpu") == 2048


def test_default_sub_block():
    """On a GPU with bfloat16 inputs a block of 2048 tokens keeps its float32 logits to
    512 MiB (S x V x 4 bytes) by forming them a sub-block at a time; with float32
    inputs the gradient overwrites the logits in place, so the block is not split."""
    assert default_block_size(8192, 128256, "gpu", itemsize=2) == 2048
    assert default_block_size(8192, 256000, "gpu", itemsize=2) == 2048
    assert default_sub_block(2048, 128256, "gpu", itemsize=2) == 1024
    assert default_sub_block(2048, 256000, "gpu", itemsize=2) == 512
    assert default_sub_block(2048, 256000, "gpu", itemsize=4) == 2048
    assert default_sub_block(24, 10**9, "cpu", itemsize=2) == 1  # powers of two dividing 24
    assert default_sub_block(24, 1000, "cpu", itemsize=2) == 8
