"""Every loss under `jax.checkpoint` and inside `lax.scan` (SPEC.md, conventions).

These are the two ways training code wraps a loss that the other suites do not: a
rematerialised model (`jax.checkpoint`, with and without a saving policy) and gradient
accumulation over microbatches (`lax.scan` carrying the loss, closing over the head's
weights). Each must give the loss and gradients of the plain call on the whole batch;
the plain call itself is checked against float64 NumPy in each loss's own suite.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxent

from . import oracles
from .kernels import PLATFORM_TILES, kernel_mode
from .linear.grouping import grouped

F32 = jnp.float32
K, B, C = 3, 5, 37  # microbatches, rows per microbatch, classes
CE_OPTIONS = dict(ignore_index=2, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, class_weights=True)


def _class_weights(opts):
    opts = dict(opts)
    if opts.get("class_weights") is True:
        opts["class_weights"] = jnp.linspace(0.5, 2.0, C, dtype=F32)
    return opts


def _logits(seed, shape=(K, B, C), scale=3.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, F32) * scale


def _labels(seed, shape=(K, B), high=C):
    labels = jax.random.randint(jax.random.PRNGKey(seed), shape, 0, high, jnp.int32)
    return labels.at[0, 0].set(2)  # one ignored position (ignore_index=2)


def _probabilities(seed):
    return jax.nn.softmax(_logits(seed, scale=1.0), axis=-1)


def _bits(seed):
    return jax.random.bernoulli(jax.random.PRNGKey(seed), 0.3, (K, B, C)).astype(F32)


# name -> (loss of (logits, other, reduction), the other argument, implementation).
# The loss's logits and other argument carry a leading microbatch axis of K. "pallas"
# runs the GPU kernel, "pallas tpu" the TPU kernel (`PLATFORM_TILES`).
PLAIN = {
    "cross_entropy": (jaxent.cross_entropy, _labels(1), CE_OPTIONS, "xla"),
    "cross_entropy pallas": (jaxent.cross_entropy, _labels(1), CE_OPTIONS, "pallas"),
    "cross_entropy pallas tpu": (jaxent.cross_entropy, _labels(1), CE_OPTIONS, "pallas tpu"),
    "soft_cross_entropy": (
        jaxent.soft_cross_entropy,
        _probabilities(2),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, class_weights=True),
        "xla",
    ),
    "soft_cross_entropy pallas": (
        jaxent.soft_cross_entropy,
        _probabilities(2),
        dict(label_smoothing=0.1, z_loss=1e-3, class_weights=True),
        "pallas",
    ),
    "binary_cross_entropy": (
        jaxent.binary_cross_entropy,
        _bits(3),
        dict(pos_weight=jnp.full((C,), 2.0, F32), label_smoothing=0.05),
        None,
    ),
    "focal_loss": (jaxent.focal_loss, _bits(3), dict(alpha=0.25, gamma=2.0), None),
    "kl_divergence": (jaxent.kl_divergence, _logits(4), dict(temperature=2.0), None),
}


def _plain(name):
    """(f(logits, other) -> summed loss, logits, other, context the call runs in)."""
    fn, other, opts, impl = PLAIN[name]
    opts = _class_weights(opts)
    context = None
    if impl is not None:
        opts["implementation"], _, platform = impl.partition(" ")
    if impl is not None and impl.startswith("pallas"):
        context = kernel_mode(**PLATFORM_TILES[platform or "gpu"])
    return (
        lambda x, o: fn(x, o, reduction="sum", **opts),
        _logits(0),
        other,
        context or contextlib.nullcontext(),
    )


def _close(got, want, tol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert oracles.rel_err(a, b) < tol


POLICIES = {
    "save nothing": None,  # jax.checkpoint's default: the backward re-runs the forward
    "save dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_losses_under_checkpoint(name, policy):
    loss, x, other, context = _plain(name)
    with context:
        want = jax.jit(jax.value_and_grad(loss))(x, other)
        remat = jax.checkpoint(loss, policy=POLICIES[policy])
        got = jax.jit(jax.value_and_grad(remat))(x, other)
    _close(got, want)


def _accumulate(loss, x, other):
    """Σ_k loss(x[k], other[k]) by `lax.scan` over the leading microbatch axis."""

    def step(total, batch):
        return total + loss(*batch), None

    return lax.scan(step, jnp.zeros((), F32), (x, other))[0]


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_losses_accumulated_over_microbatches_by_scan(name):
    """Summed loss over K microbatches by `lax.scan` == the sum over the whole batch, and
    the gradient of each microbatch's logits is that slice of the whole gradient."""
    loss, x, other, context = _plain(name)
    with context:
        got = jax.jit(jax.value_and_grad(lambda x: _accumulate(loss, x, other)))(x)
        want = jax.jit(jax.value_and_grad(lambda x: loss(x, other)))(x)
    _close(got, want)


# linear_cross_entropy: (implementation, block_size, tiles for "pallas").
LINEAR = {
    "xla": ("xla", None),
    "chunked": ("chunked", 4),
    "lean": ("lean", 16),
    "pallas": ("pallas", 16),
    # The TPU kernels, reading blocks from w in place (lean's runs of 4, as on a TPU).
    "pallas tpu": ("pallas", 16),
}
D = 8


def _linear(case):
    impl, block = LINEAR[case]
    opts = _class_weights(CE_OPTIONS)
    x = jax.random.normal(jax.random.PRNGKey(5), (K, B, D), F32)
    w = jax.random.normal(jax.random.PRNGKey(6), (C, D), F32) * 0.5
    bias = jax.random.normal(jax.random.PRNGKey(7), (C,), F32) * 0.1

    def loss(x, labels, w, bias, reduction="sum", return_aux=False):
        return jaxent.linear_cross_entropy(
            x,
            w,
            labels,
            bias=bias,
            implementation=impl,
            block_size=block,
            reduction=reduction,
            return_aux=return_aux,
            **opts,
        )

    context = contextlib.ExitStack()
    if case == "pallas":
        context.enter_context(kernel_mode(block_rows=16, block_classes=16))
    elif case == "pallas tpu":
        context.enter_context(kernel_mode("tpu"))
        context.enter_context(grouped(4))
    return loss, x, _labels(1), w, bias, context


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_cross_entropy_under_checkpoint(case, policy):
    loss, x, labels, w, bias, context = _linear(case)
    grad = jax.value_and_grad(loss, argnums=(0, 2, 3))
    remat = jax.value_and_grad(jax.checkpoint(loss, policy=POLICIES[policy]), argnums=(0, 2, 3))
    with context:
        _close(jax.jit(remat)(x, labels, w, bias), jax.jit(grad)(x, labels, w, bias))


@pytest.mark.parametrize("case", sorted(LINEAR))
def test_linear_cross_entropy_mean_accumulated_over_microbatches(case):
    """Gradient accumulation as training code does it: scan over microbatches summing
    the losses and `aux.weight_sum` (the closed-over head weights' gradients accumulate
    through the scan), then divide — equal to the "mean" over the whole batch."""
    loss, x, labels, w, bias, context = _linear(case)

    def accumulated(x, w, bias):
        def step(carry, batch):
            total, weight = loss(*batch, w, bias, return_aux=True)
            return (carry[0] + total, carry[1] + aux_weight(weight)), None

        zero = jnp.zeros((), F32)
        (total, weight), _ = lax.scan(step, (zero, zero), (x, labels))
        return total / weight

    def aux_weight(aux):
        return lax.stop_gradient(aux.weight_sum)

    def whole(x, w, bias):
        return loss(x, labels, w, bias, reduction="mean")

    with context:
        got = jax.jit(jax.value_and_grad(accumulated, argnums=(0, 1, 2)))(x, w, bias)
        want = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2)))(x, w, bias)
    _close(got, want, tol=1e-5)
