# SPDX-License-Identifier: Apache-2.0
"""A storage backend that keeps offloaded KV blocks in a file on local disk.

The file is memory-mapped, so the transfer engines copy into it like into DRAM and the
kernel's page cache decides what stays in memory; completed stores are flushed to disk with
``msync``. Capacity is then bounded by the disk, not by RAM. Use it with the connector::

    "kv_connector_extra_config": {
        "cpu_bytes": "64GiB",
        "backend": "FileBackend",
        "backend_module_path": "file_backend",      # this file, on PYTHONPATH
        "backend_options": {"path": "/mnt/nvme/kv"}
    }

It shows the whole backend API: a constructor that reads its own options and allocates
nothing, ``num_slots``, ``open`` and the optional ``on_stored`` and ``close`` hooks.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np
import torch

from kv_offload import BackendSpec, StorageBackend
from kv_offload.config import ConfigError


class FileBackend(StorageBackend):
    """Blocks in ``<path>/kv_offload_blocks.bin`` (``.rank<r>.bin`` per worker with tensor
    parallelism); option ``path`` (a directory) is required."""

    OPTIONS = frozenset({"path"})

    def __init__(self, spec: BackendSpec) -> None:
        super().__init__(spec)
        path = spec.options.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError("backend_options", "'path' must name a directory for FileBackend")
        # One file per worker: with tensor parallelism each rank holds its own shard of a block.
        name = "kv_offload_blocks.bin" if spec.world_size == 1 else f"kv_offload_blocks.rank{spec.rank}.bin"
        self.file = os.path.join(path, name)
        self._mmap: mmap.mmap | None = None
        self._fd: int | None = None

    def num_slots(self) -> int:
        return self.spec.capacity_bytes // self.spec.slot_bytes

    def open(self) -> torch.Tensor:
        size = self.num_slots() * self.spec.slot_bytes
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        self._fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)  # sparse: disk blocks are used as slots are written
        self._mmap = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED)
        array = np.frombuffer(self._mmap, dtype=np.uint8)
        return torch.from_numpy(array).view(self.num_slots(), self.spec.slot_bytes)

    def on_stored(self, slots: Sequence[int]) -> None:
        assert self._mmap is not None
        for slot in slots:  # slots are 4 KiB aligned, as msync needs
            self._mmap.flush(slot * self.spec.slot_bytes, self.spec.slot_bytes)

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.flush()
            try:
                self._mmap.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it
            self._mmap = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
