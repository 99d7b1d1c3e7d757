# SPDX-License-Identifier: Apache-2.0
"""Storage backends and their registry (``host``; add your own with ``register``)."""

from kv_offload.backends.base import BackendSpec as BackendSpec
from kv_offload.backends.base import StorageBackend as StorageBackend
from kv_offload.registry import Registry

BACKENDS: Registry[StorageBackend] = Registry("storage backend", StorageBackend)
BACKENDS.register("host", "kv_offload.backends.host", "HostBackend")

__all__ = ["BackendSpec", "StorageBackend", "BACKENDS"]
