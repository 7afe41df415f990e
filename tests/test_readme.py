"""The README's Python examples run as printed, and compute what its text says.

Each test takes one ```python block of README.md (found by a line it contains, so
reordering the README does not break them), defines the names the block assumes, runs
it, and checks the result against an independent computation. The multi-host block
(it needs several processes) and the Equinox / Flax one (tests/test_frameworks.py
builds those models) are not run here.
"""

import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

from . import oracles

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def block(containing: str) -> str:
    """The one README Python block with a line containing `containing`."""
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {containing!r}"
    return found[0]


def run(code: str, **names) -> dict:
    scope = {"jax": jax, "jnp": jnp, "jaxent": jaxent, **names}
    exec(compile(textwrap.dedent(code), str(README), "exec"), scope)  # noqa: S102 - our own README
    return scope


def test_first_example_matches_the_float64_oracle(capsys):
    scope = run(block("labels.at[:, -8:].set(-100)"))
    logits, labels = scope["logits"], scope["labels"]
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4)
    want, want_aux = oracles.cross_entropy(logits, labels, **opts)
    assert oracles.rel_err(scope["loss"], want) < 1e-5
    assert int(scope["aux"].num_valid) == 4 * 120
    np.testing.assert_allclose(scope["aux"].accuracy, want_aux["accuracy"], rtol=1e-6)
    assert scope["grads"].shape == logits.shape
    assert np.all(np.asarray(scope["grads"])[:, -8:] == 0)  # padding: no gradient
    assert capsys.readouterr().out.strip()  # the print ran


def test_fused_head_one_liner():
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(key[0], (24, 16), jnp.float32)
    embedding = jax.random.normal(key[1], (300, 16), jnp.float32)
    labels = jax.random.randint(key[2], (24,), 0, 300).at[3].set(-100)
    scope = run(block("embedding, labels, ignore_index=-100"), **locals())
    want = oracles.cross_entropy(hidden @ embedding.T, labels, ignore_index=-100)[0]
    assert oracles.rel_err(scope["loss"], want) < 1e-5


def test_gradient_accumulation_micro_step_returns_the_sum_and_its_weight():
    key = jax.random.split(jax.random.PRNGKey(3), 3)
    params = jax.random.normal(key[0], (8, 50), jnp.float32)
    batch = SimpleNamespace(
        x=jax.random.normal(key[1], (12, 8), jnp.float32),
        y=jax.random.randint(key[2], (12,), 0, 50).at[:3].set(-100),
    )
    scope = run(block("def micro_step(params, batch)"), model=lambda p, x: x @ p)
    loss_sum, weight_sum = scope["micro_step"](params, batch)
    want = oracles.cross_entropy(batch.x @ params, batch.y, ignore_index=-100, reduction="sum")
    assert oracles.rel_err(loss_sum, want[0]) < 1e-5
    assert float(weight_sum) == 9


def test_microbatch_scan_equals_the_mean_over_the_whole_batch():
    key = jax.random.split(jax.random.PRNGKey(1), 3)
    w = jax.random.normal(key[0], (500, 32), jnp.float32)
    hidden_microbatches = jax.random.normal(key[1], (4, 16, 32), jnp.float32)
    label_microbatches = jax.random.randint(key[2], (4, 16), 0, 500).at[1, :5].set(-100)
    scope = run(block("jax.lax.scan(step"), **locals())
    whole = jaxent.linear_cross_entropy(
        hidden_microbatches.reshape(64, 32), w, label_microbatches.reshape(64), ignore_index=-100
    )
    np.testing.assert_allclose(scope["loss"], whole, rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CI simulates 8 CPUs)")
def test_sharded_head_equals_one_device():
    key = jax.random.split(jax.random.PRNGKey(2), 3)
    hidden = jax.random.normal(key[0], (32, 16), jnp.float32)
    w = jax.random.normal(key[1], (400, 16), jnp.float32)
    labels = jax.random.randint(key[2], (32,), 0, 400).at[:4].set(-100)
    scope = run(block("def loss_fn(hidden, w, labels)"), **locals())
    want = jaxent.linear_cross_entropy(hidden, w, labels, ignore_index=-100)
    np.testing.assert_allclose(scope["loss"], want, rtol=1e-5)
    assert scope["hidden"].sharding.spec == jax.sharding.PartitionSpec("batch")
