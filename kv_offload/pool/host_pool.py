# SPDX-License-Identifier: Apache-2.0
"""The host block pool: one large allocation carved into fixed-size slots.

Memory comes from ``mmap``: anonymous and private by default, or a named POSIX shared-memory
segment (``/dev/shm/kv_offload.<name>``, created exclusively with mode 0600) so several
processes on one node map the same pool. With CUDA present the region is page-locked with
``cudaHostRegister`` in chunks (never torch's pinned caching allocator, which rounds sizes up
to a power of two); if that fails the pool stays pageable with a warning. With a NUMA node the
region is bound to that node before its first touch, then touched in parallel.

A shared pool starts with a 4 KiB header (magic, slot size, slot count, geometry, owner), so
a reader can :meth:`HostPool.attach` it without knowing its shape in advance. What is found
at the segment's name is checked before use, and a segment left by a dead owner is reclaimed
(see :mod:`kv_offload.pool.segment`).

A read-only attach maps the segment copy-on-write (``MAP_PRIVATE``): torch has no read-only
tensors, and writes to a ``PROT_READ`` mapping kill the process with SIGSEGV. Writes through
the reader's ``tensor`` therefore stay in that process (the written pages stop following the
owner's updates) and never reach the segment; transfer engines refuse STORE jobs into such a
pool (:func:`is_read_only`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import mmap
import os
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

from kv_offload.pool.numa import bind_to_node
from kv_offload.pool.segment import (
    HEADER_BYTES,
    Owner,
    PoolError,
    SegmentHeader,
    create_segment,
    is_same_file,
    open_segment,
    read_header,
)

__all__ = ["PinMode", "PoolSpec", "HostPool", "PoolError", "shm_path", "is_read_only", "HEADER_BYTES"]

logger = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"
# fullmatch: "$" alone would also accept a trailing newline ("x\n").
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# Address ranges of live read-only attaches; an entry goes when its mapping is freed.
_read_only_lock = threading.Lock()
_read_only: dict[int, tuple[int, int]] = {}
_read_only_keys = itertools.count()


def _forget_read_only(key: int) -> None:
    with _read_only_lock:
        _read_only.pop(key, None)


def is_read_only(address: int, nbytes: int) -> bool:
    """Whether ``[address, address + nbytes)`` overlaps a pool attached with ``readonly=True``."""
    with _read_only_lock:
        return any(start < address + nbytes and address < end for start, end in _read_only.values())


class PinMode(str, enum.Enum):
    #: page-lock when a CUDA device is present
    AUTO = "auto"
    #: never page-lock
    NEVER = "never"


def shm_path(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(f"shm_name {shown} must be 1-128 letters, digits, '_', '.' or '-'")
    return os.path.join(_SHM_DIR, f"kv_offload.{name}")


@dataclass(frozen=True)
class PoolSpec:
    """How to build a pool.

    Args:
        capacity_bytes: bytes available for slots (the header of a shared pool is extra).
        slot_bytes: bytes per slot (a multiple of 4096; see ``KVGeometry.slot_bytes``).
        pin: page-lock for CUDA DMA (see :class:`PinMode`).
        shm_name: name of a shared-memory segment to create (``None``: private memory).
        numa_node: bind the pool to this NUMA node (``None``: the kernel's default policy).
        prefault: touch every page at start (always done for a NUMA-bound or pinned pool).
        metadata: plain data stored in a shared pool's header (e.g. the KV geometry).
    """

    capacity_bytes: int
    slot_bytes: int
    pin: PinMode = PinMode.AUTO
    shm_name: str | None = None
    numa_node: int | None = None
    prefault: bool = False
    metadata: dict[str, Any] | None = None

    @property
    def num_slots(self) -> int:
        return self.capacity_bytes // self.slot_bytes

    def __post_init__(self) -> None:
        if self.slot_bytes <= 0 or self.slot_bytes % 4096:
            raise ValueError(f"slot_bytes must be a positive multiple of 4096, got {self.slot_bytes}")
        if self.capacity_bytes < self.slot_bytes:
            raise ValueError(
                f"cpu_bytes={self.capacity_bytes} cannot hold one KV block of {self.slot_bytes} bytes"
            )
        if self.shm_name is not None:
            shm_path(self.shm_name)


class HostPool:
    """``num_slots`` slots of ``slot_bytes`` in one mapping; ``tensor`` is ``uint8[num_slots, slot_bytes]``."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.num_slots = spec.num_slots
        self.slot_bytes = spec.slot_bytes
        self.readonly = False
        self.shm_path: str | None = None
        self._owner = True
        self._fd: int | None = None
        self._registered: list[tuple[int, int]] = []
        self._forget: weakref.finalize[[int], mmap.mmap] | None = None
        data_bytes = self.num_slots * self.slot_bytes
        if spec.shm_name is None:
            self._mmap = mmap.mmap(-1, data_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._data_offset = 0
        else:
            self._mmap = self._create_shared(spec, data_bytes)
            self._data_offset = HEADER_BYTES
        self.tensor = self._view(data_bytes)
        self.base_ptr = int(self.tensor.data_ptr())
        if spec.numa_node is not None:
            bind_to_node(self.base_ptr, data_bytes, spec.numa_node)
        self.pinned = self._maybe_pin(spec.pin)
        if spec.prefault or spec.numa_node is not None:
            # First touch, spread over torch's threads, so pages land on the bound node.
            self.tensor.zero_()

    # -- construction ----------------------------------------------------------------------
    def _create_shared(self, spec: PoolSpec, data_bytes: int) -> mmap.mmap:
        assert spec.shm_name is not None
        path = shm_path(spec.shm_name)
        total = HEADER_BYTES + data_bytes
        # Checked before the segment exists: a failure after O_CREAT would leave it behind.
        header = SegmentHeader(self.num_slots, self.slot_bytes, dict(spec.metadata or {}), Owner.current()).encode()
        stat = os.statvfs(_SHM_DIR)
        if stat.f_bavail * stat.f_frsize < total:
            raise PoolError(
                f"{_SHM_DIR} has {stat.f_bavail * stat.f_frsize} bytes free, the pool needs {total}"
                " (raise the container's shm size or lower cpu_bytes)"
            )
        fd = create_segment(path, spec.shm_name, total)
        try:
            mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        mm[: len(header)] = header
        self._fd = fd
        self.shm_path = path
        return mm

    def _view(self, data_bytes: int) -> torch.Tensor:
        # Every mapping is writable (a read-only attach is copy-on-write), so torch gets a
        # writable buffer and a write through the tensor can never fault.
        arr = np.frombuffer(self._mmap, dtype=np.uint8, count=data_bytes, offset=self._data_offset)
        return torch.from_numpy(arr).view(self.num_slots, self.slot_bytes)

    def _maybe_pin(self, mode: PinMode) -> bool:
        if mode is PinMode.NEVER or self.readonly:
            return False
        from kv_offload.cuda.runtime import cuda_available, host_register

        if not cuda_available():
            return False
        try:
            self._registered = host_register(self.base_ptr, self.num_slots * self.slot_bytes)
        except Exception as exc:  # pageable memory still works, only slower
            warnings.warn(
                f"kv_offload: pinning the {self.num_slots * self.slot_bytes} byte host pool failed"
                f" ({exc}); it stays pageable and transfers will be slower",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    @classmethod
    def attach(cls, shm_name: str, *, readonly: bool = True) -> HostPool:
        """Map an existing shared pool created by another process (read-only by default).

        The segment must be a regular file owned by this user with a valid header; anything
        else is a :class:`PoolError`. Read-only maps it copy-on-write: writes through
        ``tensor`` stay in this process and never reach the segment (see the module doc).
        """
        path = shm_path(shm_name)
        try:
            fd, st = open_segment(path, write=not readonly)
        except FileNotFoundError as exc:
            raise PoolError(f"no shared pool named {shm_name!r} ({path})") from exc
        try:
            header = read_header(fd, st, path)
            if readonly:
                # MAP_PRIVATE: writable pages that are copied on first write, so a stray write
                # neither faults nor reaches the segment; unwritten pages show the owner's data.
                prot = mmap.PROT_READ | mmap.PROT_WRITE
                mm = mmap.mmap(fd, header.total_bytes, flags=mmap.MAP_PRIVATE, prot=prot)
            else:
                mm = mmap.mmap(fd, header.total_bytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self = cls.__new__(cls)
        self.spec = PoolSpec(
            capacity_bytes=header.num_slots * header.slot_bytes,
            slot_bytes=header.slot_bytes,
            pin=PinMode.NEVER,
            metadata=header.metadata,
        )
        self.num_slots = header.num_slots
        self.slot_bytes = header.slot_bytes
        self.readonly = readonly
        self.shm_path = path
        self._owner = False
        self._fd = fd
        self._registered = []
        self._forget = None
        self._mmap = mm
        self._data_offset = HEADER_BYTES
        self.tensor = self._view(self.num_slots * self.slot_bytes)
        self.base_ptr = int(self.tensor.data_ptr())
        self.pinned = False
        if readonly:
            key = next(_read_only_keys)
            with _read_only_lock:
                _read_only[key] = (self.base_ptr, self.base_ptr + self.nbytes)
            # Dropped when the mapping goes: at close, or later when the last view goes.
            self._forget = weakref.finalize(mm, _forget_read_only, key)
        return self

    # -- use -------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.spec.metadata or {})

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def slot(self, index: int) -> torch.Tensor:
        """``uint8[slot_bytes]`` view of one slot."""
        if not 0 <= index < self.num_slots:
            raise IndexError(f"slot {index} out of range [0, {self.num_slots})")
        return self.tensor[index]

    def close(self) -> None:
        """Unpin, unmap and (for the creator of a shared pool) unlink the segment."""
        self._release(warn=True)

    def _release(self, warn: bool) -> None:
        if getattr(self, "_mmap", None) is None:
            return
        if self._registered:
            from kv_offload.cuda.runtime import host_unregister

            host_unregister(self._registered)
            self._registered = []
        del self.tensor
        try:
            self._mmap.close()
            if self._forget is not None:
                self._forget()  # unmapped: the range may now be reused by writable memory
        except BufferError:
            if warn:
                logger.warning("kv_offload: host pool still has live views; unmapped when they go")
        self._mmap = None  # type: ignore[assignment]
        if self._fd is not None:
            # Unlink only our own segment: after a reclaim the name may hold another's.
            if self._owner and self.shm_path is not None and is_same_file(self._fd, self.shm_path):
                try:
                    os.unlink(self.shm_path)
                except FileNotFoundError:
                    pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HostPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._release(warn=False)
        except Exception:
            pass
