"""A test hook: "lean" with runs of classes in its blocks, as on a TPU, on any backend."""

import contextlib

import jax

from jaxent.linear import api


@contextlib.contextmanager
def grouped(group: int):
    """Within: "lean" keeps runs of `group` classes together in its blocks, as it does on
    a TPU (`api.vocab_group`). The group is read when a call is traced (fixed per
    backend, so not part of the jit cache key): the caches are cleared on the way in
    and out."""
    saved = dict(api._VOCAB_GROUP)
    api._VOCAB_GROUP[jax.default_backend()] = group
    jax.clear_caches()
    try:
        yield
    finally:
        api._VOCAB_GROUP.clear()
        api._VOCAB_GROUP.update(saved)
        jax.clear_caches()
