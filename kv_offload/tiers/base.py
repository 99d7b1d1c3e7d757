# SPDX-License-Identifier: Apache-2.0
"""The interface of a tier that holds whole KV blocks by key.

A tier sits below the host-DRAM pool: the pool's slots are copied into it (``write``) and back
(``read``) whole. Every block of one tier instance has the same size, ``block_bytes`` (the pool's
slot size, a multiple of 4096). Keys are opaque ``bytes``; the tier is built for one
``namespace`` (16 bytes) and never returns a block stored under another namespace.

Threading: ``contains`` is answered from memory and is cheap enough for the engine's step;
``write``, ``read`` and ``remove`` block on I/O and are meant to run on I/O threads. All methods
may be called from several threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

__all__ = ["BlockTier", "TierStats", "NAMESPACE_BYTES"]

#: Length of a namespace digest.
NAMESPACE_BYTES = 16


@dataclass
class TierStats:
    """Counters since the tier was built, and gauges of what it holds now.

    ``blocks``/``bytes``: blocks this instance knows are stored (its index), and their body
    bytes. ``hits``/``misses``: blocks ``read`` returned / did not find. ``corruptions``: blocks
    that failed their checksum or header check (each was a miss, and was removed).
    ``writes``: blocks stored. ``write_failures``: blocks not stored because of an I/O error.
    ``refused``: blocks not stored because no room could be made. ``read_failures``: reads that
    failed with an I/O error (each was a miss too). ``evictions``: blocks removed to make room.
    """

    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    corruptions: int = 0
    writes: int = 0
    write_failures: int = 0
    refused: int = 0
    read_failures: int = 0
    evictions: int = 0


class BlockTier(ABC):
    """A store of fixed-size blocks by key. Subclass and implement the five abstract methods.

    Results are per key, in the caller's order. ``False`` never raises: a tier that cannot store
    or read a block says so and counts it, and the caller goes on. Arguments that are wrong
    (a buffer of the wrong size, an over-long key) raise ``ValueError`` naming the item.
    """

    def __init__(self, namespace: bytes, block_bytes: int) -> None:
        if not isinstance(namespace, bytes) or len(namespace) != NAMESPACE_BYTES:
            raise ValueError(f"namespace must be {NAMESPACE_BYTES} bytes, got {namespace!r}")
        if not isinstance(block_bytes, int) or block_bytes <= 0 or block_bytes % 4096:
            raise ValueError(f"block_bytes must be a positive multiple of 4096, got {block_bytes!r}")
        self.namespace = namespace
        self.block_bytes = block_bytes

    @abstractmethod
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held, from the in-memory index only (no I/O)."""

    @abstractmethod
    def write(self, items: Sequence[tuple[bytes, memoryview]]) -> list[bool]:
        """Store each ``(key, block)``; blocking. ``False`` = not stored (counted).

        A key already held is only marked used (equal keys mean equal content).
        """

    @abstractmethod
    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        """Copy each key's block into the writable buffer ``into[i]``; blocking.

        ``True``: ``into[i]`` holds the whole block, its checksum verified. ``False``: a miss or
        a corrupt block; ``into[i]`` is then unchanged (miss) or zeroed (a read that failed part
        way), never left holding bytes that look valid.
        """

    @abstractmethod
    def remove(self, keys: Sequence[bytes]) -> list[bool]:
        """Drop each key; ``True`` where this instance held it."""

    @abstractmethod
    def stats(self) -> TierStats:
        """A snapshot of the counters (a copy; later calls do not change it)."""

    def register_memory(self, buffer: memoryview) -> None:
        """The host memory blocks are read into and written from (the pool), given once
        before any I/O, for tiers that move data in place and must register it first.
        Default: nothing to do."""

    def refresh(self) -> None:
        """Pick up blocks other processes stored in a shared medium. Default: nothing to do."""

    def hold(self, keys: Sequence[bytes]) -> None:
        """A read of ``keys`` is queued: until :meth:`release`, a write must not make room by
        evicting them (the scheduler offered them; evicted, their promotion fails and the
        request recomputes). Called once per queued read, each matched by one ``release``.
        Default: nothing (a tier that does not evict its own blocks, e.g. a remote store)."""

    def release(self, keys: Sequence[bytes]) -> None:
        """The read queued with :meth:`hold` has ended. Default: nothing."""

    def evict(self, keys: Sequence[bytes]) -> None:
        """Make room before a write by dropping those of ``keys`` that are this instance's to
        evict (the connector's scheduler chooses them, so that the tier never evicts a block
        it may have offered). Unlike :meth:`remove`, never drops a block another process
        stored nor one held by :meth:`hold`. Default: nothing (the tier makes room itself)."""

    def close(self) -> None:
        """Release threads, files and locks. Default: nothing to release. Idempotent."""

    def __enter__(self) -> BlockTier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
