"""The losses inside the training steps of Equinox, Flax NNX and Flax Linen models.

Each framework keeps a language-model head in its own layout; the test passes it to
`linear_cross_entropy` the way the README shows (Equinox `Linear.weight` is already
(V, D); an NNX `Linear` kernel is (D, V) and goes in as `.T`; a Linen `Embed` table is
(V, D), the tied-embedding head). Oracle: the framework's own materialised logits fed
to optax's cross-entropy, differentiated by the framework's own grad. Then a few optax
steps under the framework's jit must train the model.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxent

from . import oracles

eqx = pytest.importorskip("equinox")
flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

N, DIN, D, V = 48, 12, 16, 97  # tokens, input features, hidden size, vocabulary


def _data():
    """Inputs and labels a small model can fit: the label is a function of the input."""
    x = jax.random.normal(jax.random.PRNGKey(0), (N, DIN), jnp.float32)
    proj = jax.random.normal(jax.random.PRNGKey(1), (DIN, V), jnp.float32)
    return x, jnp.argmax(x @ proj, axis=-1)


def _optax_mean(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_same_grads(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape
        assert oracles.rel_err(a, b) < 1e-5


def _assert_trains(step, state, steps=30):
    losses = []
    for _ in range(steps):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[:: steps // 6]


def _assert_adam_trains(value_and_grad, params, apply_updates, arrays=lambda p: p, jit=jax.jit):
    """`_assert_trains` with optax's Adam: value_and_grad(params) -> (loss, grads),
    `apply_updates` the framework's, `arrays` the optimised leaves of params."""
    optimizer = optax.adam(3e-2)

    @jit
    def step(state):
        params, opt_state = state
        value, grads = value_and_grad(params)
        updates, opt_state = optimizer.update(grads, opt_state, arrays(params))
        return (apply_updates(params, updates), opt_state), value

    _assert_trains(step, (params, optimizer.init(arrays(params))))


class EqxLM(eqx.Module):
    body: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.body = eqx.nn.Linear(DIN, D, key=k1)
        self.head = eqx.nn.Linear(D, V, key=k2)

    def hidden(self, x):
        return jax.nn.gelu(jax.vmap(self.body)(x))


def test_equinox_head_weight_is_w():
    x, labels = _data()
    model = EqxLM(jax.random.PRNGKey(2))

    def loss(model, x, labels):
        head = model.head
        return jaxent.linear_cross_entropy(model.hidden(x), head.weight, labels, bias=head.bias)

    def reference(model, x, labels):
        return _optax_mean(jax.vmap(model.head)(model.hidden(x)), labels)

    got = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model, x, labels)
    want = eqx.filter_jit(eqx.filter_value_and_grad(reference))(model, x, labels)
    _assert_same_grads(got, want)

    _assert_adam_trains(
        lambda model: eqx.filter_value_and_grad(loss)(model, x, labels),
        model,
        eqx.apply_updates,
        arrays=lambda model: eqx.filter(model, eqx.is_array),
        jit=eqx.filter_jit,
    )


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(DIN, D, rngs=rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def hidden(self, x):
        return jax.nn.gelu(self.body(x))


def test_flax_nnx_kernel_goes_in_transposed():
    x, labels = _data()
    model = NnxLM(nnx.Rngs(3))

    def loss(model, x, labels):
        head = model.head
        return jaxent.linear_cross_entropy(
            model.hidden(x), head.kernel[...].T, labels, bias=head.bias[...]
        )

    def reference(model, x, labels):
        return _optax_mean(model.head(model.hidden(x)), labels)

    got = nnx.jit(nnx.value_and_grad(loss))(model, x, labels)
    want = nnx.jit(nnx.value_and_grad(reference))(model, x, labels)
    _assert_same_grads(nnx.state(got[1]), nnx.state(want[1]))
    assert oracles.rel_err(got[0], want[0]) < 1e-6

    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model, x, labels)
        optimizer.update(model, grads)
        return value

    _assert_trains(lambda state: (state, train_step(*state)), (model, optimizer))


class LinenLM(linen.Module):
    """Tied embeddings: inputs are token ids, the head is the embedding table."""

    @linen.compact
    def __call__(self, tokens):
        embed = linen.Embed(V, D, name="embed")
        hidden = linen.gelu(linen.Dense(D, name="body")(embed(tokens)))
        return hidden, embed


def test_flax_linen_tied_embedding_table_is_w():
    _, labels = _data()
    tokens = jnp.roll(labels, 1)  # predict the token after each one: learnable
    model = LinenLM()
    params = model.init(jax.random.PRNGKey(4), tokens)

    def loss(params, tokens, labels):
        hidden, _ = model.apply(params, tokens)
        table = params["params"]["embed"]["embedding"]
        return jaxent.linear_cross_entropy(hidden, table, labels)

    def reference(params, tokens, labels):
        hidden, embed = model.apply(params, tokens)
        return _optax_mean(embed.attend(hidden), labels)

    got = jax.jit(jax.value_and_grad(loss))(params, tokens, labels)
    want = jax.jit(jax.value_and_grad(reference))(params, tokens, labels)
    _assert_same_grads(got, want)

    _assert_adam_trains(
        lambda params: jax.value_and_grad(loss)(params, tokens, labels),
        params,
        optax.apply_updates,
    )
