# SPDX-License-Identifier: Apache-2.0
"""The scheduler half's view of the tiers below the pool (disk, remote): what it asks them,
what its workers wrote there, and which blocks it no longer offers from them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kv_offload.manager import OffloadManager

__all__ = ["PENDING", "REMOTE_RETRY_S", "TIER_ORDER", "LowerTier", "TierIndex"]

#: the lower tiers, top to bottom: a block is looked up in this order below the pool
TIER_ORDER = ("disk", "remote")
#: seconds before a block whose promotion from the remote tier failed is offered again
REMOTE_RETRY_S = 30.0
#: the time of a write or eviction planned and not yet settled, in ``LowerTier.written`` and
#: ``LowerTier.gone``: later than any refresh of the index, so the record decides until it settles
PENDING = float("inf")


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
    #: blocks our workers wrote there -> when the write settled (monotonic; ``PENDING`` while
    #: a planned write-back runs, see :meth:`plan_write`). The index may
    #: learn of them only later, so they are offered meanwhile; once an index that re-reads
    #: the tier (the disk's: ``refreshed_at``) has done so since, the index decides: the tier
    #: may have evicted them (found by the soak: a disk smaller than this record).
    written: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    #: the other side of ``written``: blocks it dropped because the tier, full, evicted them
    #: since (see :meth:`plan_write`) -> when (``PENDING`` until the write-back that removes
    #: them settles). Until the index re-reads the tier after that, they
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

    @property
    def capacity(self) -> int | None:
        """Blocks the tier holds at most, where its index says (the disk's ``capacity_blocks``)."""
        return getattr(self.index, "capacity_blocks", None) or None

    def plan_write(self, keys: Sequence[bytes], busy: Collection[bytes]) -> tuple[list[bytes], list[bytes]]:
        """A write-back of ``keys`` is planned now: returns the
        keys to write and the blocks of ours the worker removes first to make room for them.

        Where the tier's capacity is known, the scheduler chooses the evictions, not the tier
        (found by the soak: a write-back running on the worker's full disk evicted blocks the
        scheduler had offered meanwhile, from a record that learnt of the write only when it
        settled, and their promotions failed). The record takes the keys at once and drops
        its least recently written or promoted blocks, except those ``busy`` (a promotion in
        flight reads them), into ``gone``: never offered again until an index refresh after
        the write-back settled. The tier then has room without evicting anything itself. What
        finds no room (the record's front is busy) waits for a later write-back. Without a
        capacity: every key, nothing removed (the record learns of them when they settle)."""
        capacity = self.capacity
        if capacity is None:
            return list(keys), []
        writing = set(keys)  # some may be in the record: written anew after a failed promotion
        need = len(self.written) + len(writing - self.written.keys()) - capacity
        victims: list[bytes] = []
        if need > 0:
            for key in self.written:  # least recently used first
                if key not in busy and key not in writing:
                    victims.append(key)
                    if len(victims) == need:
                        break
        room = capacity - len(self.written) + len(victims)
        take: list[bytes] = []
        for key in keys:
            if key not in self.written:
                if room <= 0:
                    break
                room -= 1
            take.append(key)
        for key in victims:
            del self.written[key]
            self.gone[key] = PENDING
            self.gone.move_to_end(key)
        for key in take:
            self.written[key] = PENDING  # pinned in the pool until it settles: served from there
            self.written.move_to_end(key)
            self.gone.pop(key, None)
            self.failed.pop(key, None)
        return take, victims

    def settle_write(self, keys: Sequence[bytes], evicted: Sequence[bytes], success: bool, now: float,
                     bound: int) -> None:  # fmt: skip
        """The write-back of ``keys`` (after removing ``evicted``) settled at ``now``."""
        if success:
            for key in evicted:
                if self.gone.get(key) == PENDING:
                    self.gone[key] = now
            self.wrote(keys, now, bound)
            return
        # Failed, or cancelled before it ran: which blocks it removed or wrote is unknown. The
        # record keeps counting them all (it must never count fewer blocks than the tier holds
        # of ours, see read_failed) and offers none; the evictions go back to its front.
        ours = [key for key in keys if self.written.get(key) == PENDING]
        back = [key for key in evicted if self.gone.get(key) == PENDING and key not in self.written]
        for key in back:
            del self.gone[key]
            self.written[key] = now
        for key in reversed(back):
            self.written.move_to_end(key, last=False)
        for key in ours:
            self.written[key] = now
        self._refuse(ours + back, now, bound)

    def wrote(self, keys: Sequence[bytes], now: float, bound: int) -> None:
        """Our workers wrote ``keys`` there (settled at ``now``). The record keeps the order
        in which the blocks were written or promoted (see :meth:`read`), the order evictions
        follow. With a known capacity :meth:`plan_write` placed them already and keeps the
        record to it, by evictions only (a block dropped from the record without one would
        still take room on the tier). Without one: at most ``bound`` blocks."""
        for key in keys:
            if self.written.get(key) == PENDING:
                self.written[key] = now  # in place since it was planned
                continue
            self.written[key] = now
            self.written.move_to_end(key)
            self.gone.pop(key, None)
            self.failed.pop(key, None)  # written anew from a good pool copy
        while self.capacity is None and len(self.written) > bound:
            self.written.popitem(last=False)
        while len(self.gone) > bound:
            self.gone.popitem(last=False)

    def read(self, keys: Sequence[bytes]) -> None:
        """``keys`` were promoted from the tier: the most recently used there now."""
        for key in keys:
            if key in self.written:
                self.written.move_to_end(key)

    def read_failed(self, keys: Sequence[bytes], bound: int) -> None:
        """A promotion of ``keys`` from the tier failed: not offered from it again (see
        ``failed``) until written anew. A tier with a known capacity keeps them in the record,
        since they may still take room there (a promotion fails in its second leg too), and
        the record must never count fewer blocks than the tier holds of ours (the tier would
        then evict by itself, maybe a block the scheduler offers); they leave it in LRU order,
        as evictions (removing a block already gone is harmless)."""
        if self.capacity is None:
            for key in keys:
                self.written.pop(key, None)
        self._refuse(keys, time.monotonic(), bound)
        forget = getattr(self.index, "forget", None)
        if forget is not None:
            forget(keys)

    def _refuse(self, keys: Sequence[bytes], now: float, bound: int) -> None:
        for key in keys:
            self.failed[key] = now
            self.failed.move_to_end(key)
        while len(self.failed) > bound:
            self.failed.popitem(last=False)

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
        before its write-backs are planned). Blocks the tier holds already are left out,
        unless their promotion failed (written anew from this good copy); returns how many
        were gone from the pool already (not written through)."""
        due = [k for k in dict.fromkeys(keys) if (k not in self.written or k in self.failed) and k not in self.queue]
        ready = pool.pinnable(due)
        self.queue.update(zip(ready, pool.pin(ready)))
        return len(due) - len(ready)
