"""A test hook: "lean" with runs of classes in its blocks, as on a TPU, on any backend."""

import contextlib

import jax

from jaxent.linear import api


@contextlib.contextmanager
def grouped(group: int):
    """Within: "lean" keeps runs of `group` classes together in its blocks, as it does on
    a TPU (`api.vocab_group`). The group is read when a call is traced (fixed per
    backend, so not part of the jit cache key): the cache of `linear_cross_entropy`'s
    jitted core is cleared on the way in and out (all of JAX's caches would make every
    later test in the worker compile again)."""
    saved = dict(api._VOCAB_GROUP)
    api._VOCAB_GROUP[jax.default_backend()] = group
    api._linear_cross_entropy.clear_cache()
    try:
        yield
    finally:
        api._VOCAB_GROUP.clear()
        api._VOCAB_GROUP.update(saved)
        api._linear_cross_entropy.clear_cache()
