"""Training with a vocabulary- and data-parallel output head on a 2 x 4 device mesh.

A small next-token model (token embedding -> MLP -> output head over V classes) is
trained with optax on 8 devices: the batch is split over the mesh axis "batch" (2)
and the output head `w` (V, D), its bias and the logits over "vocab" (4). The loss is
`jaxent.linear_cross_entropy` inside `jax.shard_map` with `batch_axis_name="batch"`
and `vocab_axis_name="vocab"`: each device holds a quarter of the head and half of the
tokens, never the (tokens x V) logits, and only per-token statistics, the partial
hidden-state gradient and the data-parallel gradient sums cross devices.

Before training, the sharded loss is checked against the same loss on one device
with the whole batch and the whole head.

On a machine without 8 accelerators the devices are simulated CPU devices: the
script asks XLA for 8 host devices before JAX starts (unless XLA_FLAGS already
chooses a count).

    python examples/sharded.py [--steps 100] [--vocab 4096] [--tokens 1024]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402

# Where each parameter lives: the head is split by rows (classes) over "vocab"; the
# small embedding and MLP are replicated.
PARAM_SPECS = {"embed": P(), "hidden": P(), "head": P("vocab", None), "bias": P("vocab")}
DATA_SPEC = P("batch")


def make_data(key, vocab: int, tokens: int):
    """(token, next token) pairs: next = perm[token] 90% of the time, random otherwise."""
    k_perm, k_tok, k_noise, k_rand = jax.random.split(key, 4)
    perm = jax.random.permutation(k_perm, vocab)
    inputs = jax.random.randint(k_tok, (tokens,), 0, vocab)
    noisy = jax.random.uniform(k_noise, (tokens,)) < 0.1
    return inputs, jnp.where(noisy, jax.random.randint(k_rand, (tokens,), 0, vocab), perm[inputs])


def init_params(key, vocab: int, dim: int) -> dict:
    k_embed, k_hidden, k_head = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k_embed, (vocab, dim)) / jnp.sqrt(dim),
        "hidden": jax.random.normal(k_hidden, (dim, dim)) / jnp.sqrt(dim),
        "head": jax.random.normal(k_head, (vocab, dim)) / jnp.sqrt(dim),
        "bias": jnp.zeros((vocab,)),
    }


def loss_fn(params, inputs, targets, **axis_names):
    """Mean next-token loss. With axis names: this device's tokens and head rows."""
    h = params["embed"][inputs]
    h = h + jax.nn.gelu(h @ params["hidden"])
    return jaxent.linear_cross_entropy(
        h, params["head"], targets, bias=params["bias"], label_smoothing=0.05, **axis_names
    )


def sharded_value_and_grad(mesh):
    """(loss, grads) of the whole batch, computed shard by shard under shard_map.

    Gradients of the replicated parameters are summed over the batch axis by JAX
    itself; the head's gradient stays split over "vocab" like the head."""
    names = dict(batch_axis_name="batch", vocab_axis_name="vocab")
    return jax.shard_map(
        jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y, **names)),
        mesh=mesh,
        in_specs=(PARAM_SPECS, DATA_SPEC, DATA_SPEC),
        out_specs=(P(), PARAM_SPECS),
    )


def make_mesh(batch: int, vocab: int):
    devices = jax.devices()
    if len(devices) < batch * vocab:
        raise SystemExit(f"needs {batch * vocab} devices, found {len(devices)}: {devices}")
    return jax.make_mesh((batch, vocab), ("batch", "vocab"), devices=devices[: batch * vocab])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.tokens % 2 or args.vocab % 4:
        parser.error("needs --steps >= 1, --tokens divisible by 2 and --vocab by 4")

    mesh = make_mesh(2, 4)
    k_data, k_params = jax.random.split(jax.random.PRNGKey(0))
    inputs, targets = make_data(k_data, args.vocab, args.tokens)
    params = init_params(k_params, args.vocab, args.dim)

    # One device, whole batch, whole head: what the sharded loss must equal.
    reference = float(jax.jit(loss_fn)(params, inputs, targets))

    def place(tree, specs):
        return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)

    params = place(params, PARAM_SPECS)
    inputs, targets = place((inputs, targets), (DATA_SPEC, DATA_SPEC))
    head = params["head"].addressable_shards[0].data.shape
    print(f"mesh {dict(mesh.shape)}; per device: head {head} of {params['head'].shape}, "
          f"{args.tokens // 2} of {args.tokens} tokens")  # fmt: skip

    value_and_grad = sharded_value_and_grad(mesh)
    optimizer = optax.adam(args.lr)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = value_and_grad(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, inputs, targets)
        losses.append(float(loss))
        if i == 0:
            gap = abs(losses[0] - reference) / reference
            print(f"step 0: sharded loss {losses[0]:.6f}, one device {reference:.6f} "
                  f"(relative difference {gap:.1e})")  # fmt: skip
            if gap > 1e-5:
                raise SystemExit("the sharded loss differs from the single-device loss")
        elif i % 10 == 0 or i == args.steps - 1:
            print(f"step {i}: loss {losses[-1]:.4f}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess: {np.log(args.vocab):.3f})")
    return {"losses": losses, "reference": reference, "gap": gap}


if __name__ == "__main__":
    main()
