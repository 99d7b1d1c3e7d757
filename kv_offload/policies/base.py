# SPDX-License-Identifier: Apache-2.0
"""Eviction-policy interface.

A policy orders the blocks held in the pool and picks victims. The manager owns everything
else (slots, ref-counts, which blocks may not be evicted) and tells the policy what happens
through four calls. Keys are block-hash ``bytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

__all__ = ["EvictionPolicy", "OffloadKey"]

#: A block's key: the engine's block hash (prefix-chained), as bytes.
OffloadKey = bytes


class EvictionPolicy(ABC):
    """Chooses which stored blocks to evict.

    ``capacity`` is the pool's size in blocks (policies such as ARC size their history by
    it). Subclass and register with ``kv_offload.policies.POLICIES.register``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: OffloadKey) -> None:
        """``key`` became resident in the pool (its store was reserved)."""

    @abstractmethod
    def touch(self, key: OffloadKey) -> None:
        """``key`` was used (looked up as part of a hit, or loaded)."""

    @abstractmethod
    def remove(self, key: OffloadKey) -> None:
        """``key`` left the pool for a reason other than :meth:`evict` (a failed store)."""

    @abstractmethod
    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        """Remove and return ``n`` resident keys for which ``evictable(key)`` is true.

        All or nothing: when fewer than ``n`` can go, return ``None`` and change nothing.
        """

    def keys(self) -> Iterable[OffloadKey]:
        """Resident keys, in eviction order where the policy has one. Default: none known."""
        return ()
