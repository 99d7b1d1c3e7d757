# SPDX-License-Identifier: Apache-2.0
"""Least-recently-used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from kv_offload.policies.base import EvictionPolicy, OffloadKey

__all__ = ["LRUPolicy"]


class LRUPolicy(EvictionPolicy):
    """Evicts the least recently inserted-or-touched evictable block first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[OffloadKey, None] = OrderedDict()

    def insert(self, key: OffloadKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: OffloadKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: OffloadKey) -> None:
        self._order.pop(key, None)

    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        if n <= 0:
            return []
        victims: list[OffloadKey] = []
        for key in self._order:
            if evictable(key):
                victims.append(key)
                if len(victims) == n:
                    break
        if len(victims) < n:
            return None
        for key in victims:
            del self._order[key]
        return victims

    def keys(self) -> Iterable[OffloadKey]:
        return iter(self._order)
