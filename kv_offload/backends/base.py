# SPDX-License-Identifier: Apache-2.0
"""Storage-backend interface: the medium that holds offloaded KV blocks.

A backend owns a region of ``num_slots`` fixed-size slots that the transfer engines copy
blocks into and out of. The scheduler side only needs :meth:`StorageBackend.num_slots` (the
manager hands out slot numbers); the worker side calls :meth:`StorageBackend.open` once to
get the region. Every backend is built the same way, ``Backend(spec)``, and reads its own
options from ``spec.options``.

Built in: ``host`` (DRAM: private, shared-memory, pinned, NUMA-bound; see
:mod:`kv_offload.backends.host`). ``examples/file_backend.py`` shows a backend that keeps
blocks in a file on local disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_offload.config import ConfigError
from kv_offload.geometry import KVGeometry

__all__ = ["BackendSpec", "StorageBackend"]


@dataclass(frozen=True)
class BackendSpec:
    """What every backend is built from.

    Args:
        capacity_bytes: bytes the backend may use for slots.
        geometry: the KV geometry (``geometry.slot_bytes`` bytes per slot).
        options: backend-specific options (``backend_options`` in the connector config).
        numa_node: NUMA node for host memory, if any.
        shm_name: shared-memory segment name, if the pool is to be shared.
        pin: page-lock for CUDA DMA when a GPU is present.
        world_size: workers that each build a spec like this one (``capacity_bytes`` is
            one worker's share; a node-wide limit applies to ``capacity_bytes * world_size``).
        rank: this worker's place among them (a backend with one file or name per worker
            must keep ranks apart: each holds its own shard of every block).
    """

    capacity_bytes: int
    geometry: KVGeometry
    options: Mapping[str, Any] = field(default_factory=dict)
    numa_node: int | None = None
    shm_name: str | None = None
    pin: bool = True
    world_size: int = 1
    rank: int = 0

    @property
    def slot_bytes(self) -> int:
        return self.geometry.slot_bytes


class StorageBackend(ABC):
    """A medium of ``num_slots`` slots of ``spec.slot_bytes`` bytes each.

    Subclasses implement :meth:`num_slots` and :meth:`open`; the other hooks have working
    defaults. Constructors must not allocate (the scheduler builds one only to size the pool)
    and reject a bad spec with :class:`~kv_offload.config.ConfigError` naming the config key
    (``"backend_options"``, ``"cpu_bytes"``); any other error is reported against ``backend``.
    """

    #: option names this backend accepts in ``spec.options`` (unknown ones are rejected)
    OPTIONS: frozenset[str] = frozenset()

    def __init__(self, spec: BackendSpec) -> None:
        unknown = sorted(set(spec.options) - set(self.OPTIONS))
        if unknown:
            raise ConfigError(
                "backend_options",
                f"unknown key(s) {unknown} for {type(self).__name__}; accepted: {sorted(self.OPTIONS)}",
            )
        self.spec = spec

    @abstractmethod
    def num_slots(self) -> int:
        """Capacity in blocks (the same in every process that builds this spec)."""

    @abstractmethod
    def open(self) -> torch.Tensor:
        """Allocate or map the region: a CPU ``uint8[num_slots, slot_bytes]`` tensor.

        Called once, on the worker side; the tensor must stay valid until :meth:`close`.
        """

    def on_stored(self, slots: Sequence[int]) -> None:
        """``slots`` were just written by a completed store (default: nothing to do).

        Runs on a background thread of the worker, never inside the engine step; calls
        arrive in completion order, one at a time.
        """

    @property
    def pinned(self) -> bool:
        """Whether the region is page-locked for CUDA DMA (default: no)."""
        return False

    def close(self) -> None:
        """Release the region (default: nothing to release)."""
