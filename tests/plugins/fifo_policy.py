# SPDX-License-Identifier: Apache-2.0
"""A first-in-first-out policy defined outside the package (loaded by module path)."""

from __future__ import annotations

from collections.abc import Callable

from kv_offload.policies import EvictionPolicy, OffloadKey


class FIFOPolicy(EvictionPolicy):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.order: list[OffloadKey] = []

    def insert(self, key: OffloadKey) -> None:
        self.order.append(key)

    def touch(self, key: OffloadKey) -> None:
        pass  # FIFO ignores use

    def remove(self, key: OffloadKey) -> None:
        if key in self.order:
            self.order.remove(key)

    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        victims = [k for k in self.order if evictable(k)][:n]
        if len(victims) < n:
            return None
        for k in victims:
            self.order.remove(k)
        return victims


class NotAPolicy:
    pass
