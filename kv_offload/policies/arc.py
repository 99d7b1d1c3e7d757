# SPDX-License-Identifier: Apache-2.0
"""Adaptive Replacement Cache (Megiddo and Modha, FAST 2003) as an eviction policy.

Resident blocks sit in T1 (seen once recently) or T2 (seen at least twice). Ghost lists
B1 and B2 remember keys recently evicted from T1 and T2; a new insert that hits a ghost
moves the target size ``p`` of T1 towards the list that would have kept it. Victims come
from T1 while it is above ``p``, otherwise from T2, skipping blocks the manager protects.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from kv_offload.policies.base import EvictionPolicy, OffloadKey

__all__ = ["ARCPolicy"]


class ARCPolicy(EvictionPolicy):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0
        self._t1: OrderedDict[OffloadKey, None] = OrderedDict()
        self._t2: OrderedDict[OffloadKey, None] = OrderedDict()
        self._b1: OrderedDict[OffloadKey, None] = OrderedDict()
        self._b2: OrderedDict[OffloadKey, None] = OrderedDict()

    def insert(self, key: OffloadKey) -> None:
        if key in self._b1:
            self.p = min(float(self.capacity), self.p + max(1.0, len(self._b2) / max(1, len(self._b1))))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self.p = max(0.0, self.p - max(1.0, len(self._b1) / max(1, len(self._b2))))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts()

    def touch(self, key: OffloadKey) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: OffloadKey) -> None:
        self._t1.pop(key, None)
        self._t2.pop(key, None)

    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        if n <= 0:
            return []
        # Pick victims without changing state, so a failed eviction leaves everything as is.
        t1_first = len(self._t1) > self.p
        first, second = (self._t1, self._t2) if t1_first else (self._t2, self._t1)
        victims: list[OffloadKey] = []
        for source in (first, second):
            for key in source:
                if evictable(key):
                    victims.append(key)
                    if len(victims) == n:
                        break
            if len(victims) == n:
                break
        if len(victims) < n:
            return None
        for key in victims:
            if key in self._t1:
                del self._t1[key]
                self._b1[key] = None
            else:
                del self._t2[key]
                self._b2[key] = None
        self._trim_ghosts()
        return victims

    def _trim_ghosts(self) -> None:
        while len(self._b1) > self.capacity:
            self._b1.popitem(last=False)
        while len(self._b2) > self.capacity:
            self._b2.popitem(last=False)

    def keys(self) -> Iterable[OffloadKey]:
        yield from self._t1
        yield from self._t2
