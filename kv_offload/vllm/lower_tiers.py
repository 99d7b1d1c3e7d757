# SPDX-License-Identifier: Apache-2.0
"""The scheduler half's view of the tiers below the pool (disk, remote): what it asks them,
what its workers wrote there, and which blocks it no longer offers from them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kv_offload.manager import OffloadManager

__all__ = ["REMOTE_RETRY_S", "TIER_ORDER", "LowerTier", "TierIndex"]

#: the lower tiers, top to bottom: a block is looked up in this order below the pool
TIER_ORDER = ("disk", "remote")
#: seconds before a block whose promotion from the remote tier failed is offered again
REMOTE_RETRY_S = 30.0


class TierIndex(Protocol):
    """What the scheduler asks of a tier below the pool: which blocks it holds, without
    waiting (the disk tier's in-memory index; the remote tier's
    :class:`~kv_offload.tiers.remote.lookup.RemoteIndex`). ``None`` means "not known yet"
    (a lookup still in flight): the request is asked about again next step, and the step
    never waits for a slow tier."""

    def contains(self, keys: Sequence[bytes]) -> list[bool] | None: ...


@dataclass
class LowerTier:
    """The scheduler's view of one tier below the pool."""

    name: str
    index: TierIndex
    #: completed stores are written through to it
    write: bool = True
    #: blocks our workers wrote there -> when the write settled (monotonic). The index may
    #: learn of them only later, so they are offered meanwhile; once an index that re-reads
    #: the tier (the disk's: ``refreshed_at``) has done so since, the index decides: the tier
    #: may have evicted them (found by the soak: a disk smaller than this record).
    written: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: the other side of ``written``: blocks it dropped because the tier, full, evicted them
    #: since (see :meth:`wrote`) -> when. Until the index re-reads the tier after that, they
    #: are not offered even if the index still lists them (the soak's 128-block disk: a
    #: promotion of a block evicted since the last 2 s refresh failed, and recomputed).
    gone: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: blocks whose promotion failed -> when: not offered from this tier again by this
    #: scheduler (a corrupt block in a live process's disk segment stays listed; offering it
    #: again would make the request that recomputes retry the same failing promotion forever)
    failed: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: how long a failed block stays refused (None: for good). The remote tier's failures
    #: are mostly outages, and another instance may store the block again: it is asked
    #: about again after a while.
    failed_ttl_s: float | None = None
    #: another engine's blocks, converted on load (:mod:`kv_offload.vllm.imports`): never
    #: written, and counted as imports besides their medium's hits
    imported: bool = False

    @property
    def medium(self) -> str:
        """The tier the blocks are in ("disk", "remote"); an import's name is ``disk.import0``."""
        return self.name.split(".", 1)[0]

    def ours(self, key: bytes) -> bool:
        """``key`` was written by our workers after the index last looked at the tier."""
        return self._since_seen(self.written.get(key))

    def evicted(self, key: bytes) -> bool:
        """Our workers' writes evicted ``key`` after the index last looked at the tier."""
        return self._since_seen(self.gone.get(key))

    def _since_seen(self, when: float | None) -> bool:
        if when is None:
            return False
        seen = getattr(self.index, "refreshed_at", None)
        return seen is None or when > seen

    def wrote(self, keys: Sequence[bytes], now: float, bound: int) -> None:
        """Our workers wrote ``keys`` there (settled at ``now``). The record keeps the order
        in which the worker's LRU tier evicts its own blocks (least recently written or
        promoted first, see :meth:`read`) and, where the index knows the tier's
        ``capacity_blocks``, no more blocks than that: a block written before the last that
        many is one the full tier evicted (``gone``). Without a capacity: ``bound`` blocks."""
        for key in keys:
            self.written[key] = now
            self.written.move_to_end(key)
            self.gone.pop(key, None)
            self.failed.pop(key, None)  # written anew from a good pool copy
        capacity = getattr(self.index, "capacity_blocks", None)
        while len(self.written) > (capacity or bound):
            key, _ = self.written.popitem(last=False)
            if capacity:
                self.gone[key] = now
                self.gone.move_to_end(key)
        while len(self.gone) > bound:
            self.gone.popitem(last=False)

    def read(self, keys: Sequence[bytes]) -> None:
        """``keys`` were promoted from the tier: the most recently used there now."""
        for key in keys:
            if key in self.written:
                self.written.move_to_end(key)

    def refuses(self, key: bytes) -> bool:
        when = self.failed.get(key)
        if when is None:
            return False
        if self.failed_ttl_s is not None and time.monotonic() - when > self.failed_ttl_s:
            del self.failed[key]
            return False
        return True
    #: blocks whose store or promotion settled -> their pool slot, pinned there until their
    #: write-through (planned next step) settles
    queue: dict[bytes, int] = field(default_factory=dict)

    def enqueue(self, keys: Sequence[bytes], pool: OffloadManager) -> int:
        """Pin the pool blocks ``keys`` for their write-through now, as their store settles:
        nothing evicts them before it starts (a step's stores and promotions take pool room
        before its write-backs are planned). Blocks the tier holds already are left out;
        returns how many were gone from the pool already (not written through)."""
        due = [k for k in dict.fromkeys(keys) if k not in self.written and k not in self.queue]
        ready = pool.pinnable(due)
        self.queue.update(zip(ready, pool.pin(ready)))
        return len(due) - len(ready)
