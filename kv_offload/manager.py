# SPDX-License-Identifier: Apache-2.0
"""The scheduler-side manager: which blocks the pool holds, where, and who is using them.

No tensors here: the manager hands out slot numbers and the worker moves the bytes. Every
block is keyed by its block hash (``bytes``). A block's life::

    prepare_store -> (worker copies) -> complete_store(success) -> ready
    ready: lookup / prepare_load -> (worker copies) -> complete_load -> ready
    ready and unused: may be evicted by the policy when space is needed

Rules the manager keeps (and the state-machine test checks):

* never more blocks than slots; a slot belongs to at most one key;
* a block being written (store reserved, not completed) is never looked up, loaded or evicted;
* a block being read (``prepare_load`` without ``complete_load``) is never evicted;
* ``prepare_store`` returns ``None`` ("cannot store") when eviction cannot make room, and
  changes nothing in that case;
* ``complete_store(success=False)`` frees what the store reserved.

Not thread-safe: one scheduler thread drives it, as in vLLM.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kv_offload.policies.base import EvictionPolicy, OffloadKey

__all__ = ["OffloadManager", "StorePlan", "OffloadEvent", "EventKind", "ManagerStats"]


class EventKind(str, enum.Enum):
    STORED = "stored"
    EVICTED = "evicted"


@dataclass(frozen=True)
class OffloadEvent:
    kind: EventKind
    keys: tuple[OffloadKey, ...]


@dataclass(frozen=True)
class StorePlan:
    """What ``prepare_store`` reserved: copy block ``keys[i]`` into pool slot ``slots[i]``."""

    keys: tuple[OffloadKey, ...]
    slots: tuple[int, ...]
    #: keys evicted to make room (their slots are among ``slots``)
    evicted: tuple[OffloadKey, ...]


@dataclass
class ManagerStats:
    """Monotonic counters (blocks unless named bytes)."""

    lookup_keys: int = 0
    lookup_hits: int = 0
    loads: int = 0
    load_failures: int = 0
    stores: int = 0
    store_failures: int = 0
    stores_skipped: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    slot: int
    readers: int = 0
    writing: bool = True


@dataclass
class _AdmissionTracker:
    """Counts how often each key was offered, in a bounded LRU table."""

    threshold: int
    max_size: int
    counts: OrderedDict[OffloadKey, int] = field(default_factory=OrderedDict)

    def admit(self, key: OffloadKey) -> bool:
        count = self.counts.pop(key, 0) + 1
        if count >= self.threshold:
            return True
        self._remember(key, count)
        return False

    def undo_admit(self, keys: Iterable[OffloadKey]) -> None:
        """``keys`` were admitted but not stored: their next offer admits them again."""
        for key in keys:
            self._remember(key, self.threshold - 1)

    def _remember(self, key: OffloadKey, count: int) -> None:
        self.counts[key] = count
        while len(self.counts) > self.max_size:
            self.counts.popitem(last=False)


class OffloadManager:
    """Bookkeeping for a pool of ``num_slots`` blocks of ``block_bytes`` each.

    Args:
        num_slots: pool capacity in blocks.
        policy: eviction policy instance.
        block_bytes: payload bytes per block (for the byte counters).
        store_threshold: store a block only once it was offered this many times
            (``0`` or ``1``: store on first sight).
        max_tracker_size: keys remembered by the admission counter.
    """

    def __init__(
        self,
        num_slots: int,
        policy: EvictionPolicy,
        *,
        block_bytes: int = 0,
        store_threshold: int = 0,
        max_tracker_size: int = 64_000,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self.block_bytes = block_bytes
        self.stats = ManagerStats()
        self._entries: dict[OffloadKey, _Entry] = {}
        # Pop from the end: slots are handed out 0, 1, 2, ... on a fresh pool.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._events: list[OffloadEvent] = []
        self._admission = (
            _AdmissionTracker(store_threshold, max_tracker_size) if store_threshold >= 2 else None
        )

    # -- queries -------------------------------------------------------------------------
    def lookup(self, keys: Sequence[OffloadKey]) -> int:
        """How many leading ``keys`` are stored and ready to load."""
        entries = self._entries
        hits = 0
        for key in keys:
            entry = entries.get(key)
            if entry is None or entry.writing:
                break
            hits += 1
        self.stats.lookup_keys += len(keys)
        self.stats.lookup_hits += hits
        return hits

    def contains(self, key: OffloadKey) -> bool:
        """Whether ``key`` is stored and ready (no counters touched)."""
        entry = self._entries.get(key)
        return entry is not None and not entry.writing

    @property
    def num_used(self) -> int:
        return len(self._entries)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_reading(self) -> int:
        return sum(1 for e in self._entries.values() if e.readers)

    @property
    def num_writing(self) -> int:
        return sum(1 for e in self._entries.values() if e.writing)

    def slot_of(self, key: OffloadKey) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None or entry.writing else entry.slot

    def index(self) -> dict[OffloadKey, int]:
        """Snapshot of ready blocks: key -> slot (for serving attention in place)."""
        return {k: e.slot for k, e in self._entries.items() if not e.writing}

    # -- loads ---------------------------------------------------------------------------
    def prepare_load(self, keys: Sequence[OffloadKey]) -> list[int]:
        """Protect ``keys`` from eviction while they are read; returns their slots.

        Every key must be ready (see :meth:`lookup`); raises ``KeyError`` otherwise and
        protects nothing.
        """
        entries = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.writing:
                raise KeyError(f"block {key.hex()} is not stored (or still being written)")
            entries.append(entry)
        for key, entry in zip(keys, entries):
            entry.readers += 1
            self.policy.touch(key)
        return [e.slot for e in entries]

    def complete_load(self, keys: Sequence[OffloadKey], success: bool = True) -> None:
        """The read of ``keys`` finished; they may be evicted again.

        Raises ``KeyError`` if a key has no load in progress (as often as it is listed),
        and then changes nothing.
        """
        entries = []
        for key, times in Counter(keys).items():
            entry = self._entries.get(key)
            if entry is None or entry.readers < times:
                raise KeyError(f"block {key.hex()} has no load in progress")
            entries.append((entry, times))
        for entry, times in entries:
            entry.readers -= times
        if success:
            self.stats.loads += len(keys)
            self.stats.bytes_loaded += len(keys) * self.block_bytes
        else:
            self.stats.load_failures += len(keys)

    def touch(self, keys: Iterable[OffloadKey]) -> None:
        """Mark ``keys`` recently used (those stored; others are ignored)."""
        for key in keys:
            if key in self._entries:
                self.policy.touch(key)

    # -- stores --------------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[OffloadKey]) -> StorePlan | None:
        """Reserve slots for the ``keys`` not stored yet, evicting if needed.

        Keys already stored (or being stored) are touched and skipped; with an admission
        threshold, keys not seen often enough are skipped too. Returns ``None`` when room
        cannot be made (every candidate victim is in use): nothing is changed then.
        """
        seen: set[OffloadKey] = set()
        new: list[OffloadKey] = []
        for key in keys:
            if key in seen:
                continue
            seen.add(key)
            if key in self._entries:
                self.policy.touch(key)
            elif self._admission is None or self._admission.admit(key):
                new.append(key)
        if not new:
            return StorePlan((), (), ())
        shortfall = len(new) - len(self._free)
        evicted: list[OffloadKey] = []
        if shortfall > 0:
            entries = self._entries

            def evictable(key: OffloadKey) -> bool:
                entry = entries[key]
                return entry.readers == 0 and not entry.writing and key not in seen

            victims = self.policy.evict(shortfall, evictable)
            if victims is None:
                if self._admission is not None:
                    self._admission.undo_admit(new)
                self.stats.stores_skipped += len(new)
                return None
            for key in victims:
                self._free.append(entries.pop(key).slot)
            evicted = victims
            self.stats.evictions += len(victims)
            self._events.append(OffloadEvent(EventKind.EVICTED, tuple(victims)))
        slots = []
        for key in new:
            slot = self._free.pop()
            self._entries[key] = _Entry(slot=slot)
            self.policy.insert(key)
            slots.append(slot)
        return StorePlan(tuple(new), tuple(slots), tuple(evicted))

    def complete_store(self, keys: Sequence[OffloadKey], success: bool = True) -> None:
        """The copy into the reserved slots finished; on failure the slots are freed.

        Raises ``KeyError`` if a key has no store in progress (or is listed twice), and then
        changes nothing: no block becomes readable without its STORED event.
        """
        for key, times in Counter(keys).items():
            entry = self._entries.get(key)
            if entry is None or not entry.writing or times > 1:
                raise KeyError(f"block {key.hex()} has no store in progress")
        done: list[OffloadKey] = []
        for key in keys:
            entry = self._entries[key]
            if success:
                entry.writing = False
                done.append(key)
            else:
                del self._entries[key]
                self.policy.remove(key)
                self._free.append(entry.slot)
        if success:
            self.stats.stores += len(done)
            self.stats.bytes_stored += len(done) * self.block_bytes
            if done:
                self._events.append(OffloadEvent(EventKind.STORED, tuple(done)))
        else:
            self.stats.store_failures += len(keys)

    # -- maintenance ---------------------------------------------------------------------
    def clear(self) -> int:
        """Evict every block not in use (prefix-cache reset). Returns how many went."""
        idle = [k for k, e in self._entries.items() if e.readers == 0 and not e.writing]
        for key in idle:
            self._free.append(self._entries.pop(key).slot)
            self.policy.remove(key)
        if idle:
            self.stats.evictions += len(idle)
            self._events.append(OffloadEvent(EventKind.EVICTED, tuple(idle)))
        return len(idle)

    def take_events(self) -> list[OffloadEvent]:
        events, self._events = self._events, []
        return events

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (tests, debugging)."""
        slots = [e.slot for e in self._entries.values()]
        assert len(slots) + len(self._free) == self.num_slots, "slots leaked or duplicated"
        assert len(set(slots) | set(self._free)) == self.num_slots, "a slot is owned twice"
        for key, entry in self._entries.items():
            assert entry.readers >= 0, f"negative readers on {key.hex()}"
            assert not (entry.writing and entry.readers), f"{key.hex()} read while written"
