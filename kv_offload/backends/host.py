# SPDX-License-Identifier: Apache-2.0
"""``host``: blocks in host DRAM (the default backend)."""

from __future__ import annotations

import torch

from kv_offload.backends.base import BackendSpec, StorageBackend
from kv_offload.pool.host_pool import HostPool, PinMode, PoolSpec

__all__ = ["HostBackend"]


class HostBackend(StorageBackend):
    """A :class:`~kv_offload.pool.HostPool`: private or shared memory, pinned with CUDA.

    Options: ``prefault`` (bool, touch every page at start so the first stores do not pay
    page faults; default False).
    """

    OPTIONS = frozenset({"prefault"})

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        prefault = spec.options.get("prefault", False)
        if not isinstance(prefault, bool):
            raise ValueError(f"backend_options.prefault must be a bool, got {prefault!r}")
        self._pool_spec = PoolSpec(
            capacity_bytes=spec.capacity_bytes,
            slot_bytes=spec.slot_bytes,
            pin=PinMode.AUTO if spec.pin else PinMode.NEVER,
            shm_name=spec.shm_name,
            numa_node=spec.numa_node,
            prefault=prefault,
            metadata={"geometry": spec.geometry.describe()},
        )
        self.pool: HostPool | None = None

    def num_slots(self) -> int:
        return self._pool_spec.num_slots

    def open(self) -> torch.Tensor:
        if self.pool is None:
            self.pool = HostPool(self._pool_spec)
        return self.pool.tensor

    @property
    def pinned(self) -> bool:
        return self.pool is not None and self.pool.pinned

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
