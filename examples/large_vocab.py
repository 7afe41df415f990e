"""Next-token training with a large output vocabulary, with and without materialised logits.

A tiny language model (token embedding -> MLP -> tied output embedding) learns a
synthetic sequence over V = 32,768 tokens. It is trained twice from the same
initialisation: once with `linear_cross_entropy(..., implementation="xla")`, which
materialises the (tokens x V) logits, and once with the default implementation,
which never does. The loss curves agree to float32 rounding while the compiled
training step of the default needs a fraction of the memory.

    python examples/large_vocab.py [--steps 60] [--vocab 32768] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jaxent


def make_data(key: jax.Array, vocab: int, tokens: int) -> tuple[jax.Array, jax.Array]:
    """Pairs (token, next token) from a fixed random permutation: next = perm[token]
    most of the time, a random token otherwise (so the loss has a floor above 0)."""
    k_perm, k_tok, k_noise, k_rand = jax.random.split(key, 4)
    perm = jax.random.permutation(k_perm, vocab)
    inputs = jax.random.randint(k_tok, (tokens,), 0, vocab)
    noisy = jax.random.uniform(k_noise, (tokens,)) < 0.1
    targets = jnp.where(noisy, jax.random.randint(k_rand, (tokens,), 0, vocab), perm[inputs])
    return inputs, targets


def init_params(key: jax.Array, vocab: int, dim: int) -> dict:
    k_emb, k_hidden = jax.random.split(key)
    return {
        "embedding": jax.random.normal(k_emb, (vocab, dim)) / jnp.sqrt(dim),
        "hidden": jax.random.normal(k_hidden, (dim, dim)) / jnp.sqrt(dim),
    }


def loss_fn(params: dict, inputs, targets, implementation):
    """Hidden states from the input token; logits against the tied embedding (V, D)."""
    h = params["embedding"][inputs]
    h = h + jax.nn.gelu(h @ params["hidden"])
    return jaxent.linear_cross_entropy(
        h, params["embedding"], targets, label_smoothing=0.05, implementation=implementation
    )


def train(implementation, params, inputs, targets, steps: int, lr: float):
    """Adam steps; returns the per-step losses and the compiled step's temp memory."""
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, implementation)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    compiled = step.lower(params, opt_state).compile()
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = compiled(params, opt_state)
        losses.append(float(loss))
    return losses, temp, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/large_vocab"))
    args = parser.parse_args(argv)

    key_data, key_params = jax.random.split(jax.random.PRNGKey(args.seed))
    inputs, targets = make_data(key_data, args.vocab, args.tokens)
    params = init_params(key_params, args.vocab, args.dim)

    results = {}
    for name in ("xla", None):
        losses, temp, seconds = train(name, params, inputs, targets, args.steps, args.lr)
        results[name or "default"] = {"losses": losses, "temp_bytes": temp, "seconds": seconds}

    xla, default = results["xla"], results["default"]
    gap = max(abs(a - b) for a, b in zip(xla["losses"], default["losses"], strict=True))
    logits_bytes = args.tokens * args.vocab * 4
    print(f"tokens={args.tokens} vocab={args.vocab} dim={args.dim} backend={jax.default_backend()}")
    print(f"{'step':>6} {'xla loss':>10} {'default loss':>13}")
    for i in range(0, args.steps, max(1, args.steps // 6)):
        print(f"{i:>6} {xla['losses'][i]:>10.4f} {default['losses'][i]:>13.4f}")
    print(f"max |loss difference| over {args.steps} steps: {gap:.2e}")
    for name, r in results.items():
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f} MiB"
        print(f"{name:>8}: compiled step temp {temp}, {r['seconds']:.2f} s for {args.steps} steps")
    print(f"(the float32 logits alone are {logits_bytes / 2**20:.1f} MiB)")

    summary = {"config": {k: str(v) for k, v in vars(args).items()}, "max_loss_gap": gap}
    summary.update(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
