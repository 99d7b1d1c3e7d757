# SPDX-License-Identifier: Apache-2.0
"""``host``: blocks in host DRAM (the default backend)."""

from __future__ import annotations

import os

import torch

from kv_offload.backends.base import BackendSpec, StorageBackend
from kv_offload.config import ConfigError
from kv_offload.pool.host_pool import HostPool, PinMode, PoolSpec

__all__ = ["HostBackend", "physical_memory_bytes"]


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


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
            raise ConfigError("backend_options", f"prefault must be true or false, got {type(prefault).__name__}")
        if spec.capacity_bytes < spec.slot_bytes:
            raise ConfigError(
                "cpu_bytes",
                f"{spec.capacity_bytes} bytes per worker cannot hold one KV block of {spec.slot_bytes} bytes",
            )
        total, memory = spec.capacity_bytes * spec.world_size, physical_memory_bytes()
        if memory is not None and total > memory:
            # Checked at start-up: the allocation would otherwise fail in the worker long after
            # the scheduler accepted the size (or the OOM killer would pick the server).
            raise ConfigError(
                "cpu_bytes",
                f"the pool needs {total} bytes ({spec.world_size} worker(s)) but this machine has"
                f" {memory} bytes of physical memory",
            )
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
