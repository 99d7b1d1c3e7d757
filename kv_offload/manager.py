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
* ``complete_store(success=False)`` frees what the store reserved;
* ``complete_load(success=False)`` takes the blocks out of the index (their copy may be
  bad, and a request that recomputes must not be offered the same failing load again);
  a block still read by another load is hidden at once and dropped when that load ends;
* what a plug-in eviction policy returns is checked before anything changes
  (:class:`PolicyError` otherwise);
* a store that cannot make room for every new block reserves the leading ones that fit.

Not thread-safe: one scheduler thread drives it, as in vLLM.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from kv_offload.policies.base import EvictionPolicy, OffloadKey

__all__ = ["OffloadManager", "StorePlan", "OffloadEvent", "EventKind", "ManagerStats", "PolicyError"]


class PolicyError(RuntimeError):
    """An eviction policy returned victims the manager cannot accept (a policy bug)."""


class EventKind(str, enum.Enum):
    STORED = "stored"
    EVICTED = "evicted"
    #: dropped because a load of them failed
    INVALIDATED = "invalidated"


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
    #: new keys left out because no room could be made for them (the tail of the offer)
    skipped: tuple[OffloadKey, ...] = ()


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
    #: blocks dropped from the index after a failed load
    invalidated: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    #: events discarded because nobody took them (see ``max_events``)
    events_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    slot: int
    readers: int = 0
    writing: bool = True
    #: a load of this block failed: hidden from lookups, dropped when its last reader ends
    doomed: bool = False
    #: stored and not doomed: ``not (writing or doomed)``, kept as a field for the lookup loop
    ready: bool = False


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
        max_events: stored/evicted events kept for :meth:`take_events`; older ones are
            dropped (and counted) when nobody takes them, so a server never grows them.
    """

    def __init__(
        self,
        num_slots: int,
        policy: EvictionPolicy,
        *,
        block_bytes: int = 0,
        store_threshold: int = 0,
        max_tracker_size: int = 64_000,
        max_events: int = 4096,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self.block_bytes = block_bytes
        self.stats = ManagerStats()
        self._entries: dict[OffloadKey, _Entry] = {}
        # Entries with a reader / being written, kept as counts: the gauges are read every
        # step, and a scan of the entries would cost O(pool) per step.
        self._reading = 0
        self._writing = 0
        # Free slots: those given back (reused first) plus the never-used range
        # [_fresh, num_slots), handed out 0, 1, 2, ... (no list of every slot is built).
        self._free: list[int] = []
        self._fresh = 0
        self._events: deque[OffloadEvent] = deque(maxlen=max(1, max_events))
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
            if entry is None or not entry.ready:
                break
            hits += 1
        self.stats.lookup_keys += len(keys)
        self.stats.lookup_hits += hits
        return hits

    def contains(self, key: OffloadKey) -> bool:
        """Whether ``key`` is stored and ready (no counters touched)."""
        entry = self._entries.get(key)
        return entry is not None and entry.ready

    def holds(self, key: OffloadKey) -> bool:
        """Whether ``key`` has a slot in any state (ready, being written, or invalidated)."""
        return key in self._entries

    @property
    def num_used(self) -> int:
        return len(self._entries)

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_slots - self._fresh

    @property
    def num_reading(self) -> int:
        """Blocks protected by a load or a pin (O(1))."""
        return self._reading

    @property
    def num_writing(self) -> int:
        """Blocks reserved for a store in progress (O(1))."""
        return self._writing

    def slot_of(self, key: OffloadKey) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None or not entry.ready else entry.slot

    def index(self) -> dict[OffloadKey, int]:
        """Snapshot of ready blocks: key -> slot (for serving attention in place)."""
        return {k: e.slot for k, e in self._entries.items() if e.ready}

    # -- loads ---------------------------------------------------------------------------
    def prepare_load(self, keys: Sequence[OffloadKey]) -> list[int]:
        """Protect ``keys`` from eviction while they are read; returns their slots.

        Every key must be ready (see :meth:`lookup`); raises ``KeyError`` otherwise and
        protects nothing.
        """
        entries = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or not entry.ready:
                raise KeyError(f"block {key.hex()} is not stored (or still being written, or invalidated)")
            entries.append(entry)
        for key, entry in zip(keys, entries):
            self._reading += entry.readers == 0
            entry.readers += 1
            self.policy.touch(key)
        return [e.slot for e in entries]

    def complete_load(self, keys: Sequence[OffloadKey], success: bool = True, *, count: bool = True) -> None:
        """The read of ``keys`` finished; they may be evicted again.

        On failure the blocks leave the index: whatever made the load fail (a bad copy, a
        bad block) would make the same load fail again, and the request that recomputes
        must not be matched to it. A block another load still reads is hidden now and
        dropped when that load ends. Raises ``KeyError`` if a key has no load in progress
        (as often as it is listed), and then changes nothing.
        """
        entries = []
        for key, times in Counter(keys).items():
            entry = self._entries.get(key)
            if entry is None or entry.readers < times:
                raise KeyError(f"block {key.hex()} has no load in progress")
            entries.append((key, entry, times))
        dropped: list[OffloadKey] = []
        for key, entry, times in entries:
            entry.readers -= times
            self._reading -= entry.readers == 0
            if not success and not entry.doomed:
                entry.doomed, entry.ready = True, False
                self.stats.invalidated += 1
            if entry.doomed and entry.readers == 0:
                self._release(key)
                dropped.append(key)
        if dropped:
            self._record(EventKind.INVALIDATED, dropped)
        if not count:
            return
        if success:
            self.stats.loads += len(keys)
            self.stats.bytes_loaded += len(keys) * self.block_bytes
        else:
            self.stats.load_failures += len(keys)

    def pin(self, keys: Sequence[OffloadKey]) -> list[int]:
        """Keep ready ``keys`` from eviction while their slots are read for another tier (a
        write-back): :meth:`prepare_load` that is neither a use nor counted. Raises
        ``KeyError`` (and pins nothing) unless every key is ready; :meth:`pinnable` filters."""
        entries = [self._entries.get(key) for key in keys]
        for key, entry in zip(keys, entries):
            if entry is None or not entry.ready:
                raise KeyError(f"block {key.hex()} is not stored (or still being written, or invalidated)")
        for entry in entries:
            self._reading += entry.readers == 0  # type: ignore[union-attr]
            entry.readers += 1  # type: ignore[union-attr]
        return [e.slot for e in entries]  # type: ignore[union-attr]

    def pinnable(self, keys: Iterable[OffloadKey]) -> list[OffloadKey]:
        """The ``keys`` that are ready now, in order (what :meth:`pin` accepts)."""
        return [k for k in keys if (e := self._entries.get(k)) is not None and e.ready]

    def unpin(self, keys: Sequence[OffloadKey]) -> None:
        """End a :meth:`pin`; an invalidated block whose last reader this was is dropped."""
        self.complete_load(keys, success=True, count=False)

    def touch(self, keys: Iterable[OffloadKey]) -> None:
        """Mark ``keys`` recently used (those stored; others are ignored)."""
        for key in keys:
            if key in self._entries:
                self.policy.touch(key)

    # -- stores --------------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[OffloadKey], keep: Container[OffloadKey] = ()) -> StorePlan | None:
        """Reserve slots for the ``keys`` not stored yet, evicting if needed.

        Keys already stored (or being stored) are touched and skipped; with an admission
        threshold, keys not seen often enough are skipped too. Blocks in ``keys`` and
        ``keep`` (e.g. the earlier blocks of the same prompt) are never evicted for this
        store. When room cannot be made for every new key, the leading ones that fit are
        reserved and the rest are returned in ``skipped``; ``None`` ("cannot store") means
        not even the first fits, and then nothing is changed.
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
        victims: list[OffloadKey] = []
        skipped: list[OffloadKey] = []
        shortfall = len(new) - self.num_free
        if shortfall > 0:
            victims, room = self._evict(shortfall, seen, keep)
            if room < shortfall:
                fit = len(new) - (shortfall - room)
                new, skipped = new[:fit], new[fit:]
                if self._admission is not None:
                    self._admission.undo_admit(skipped)
                self.stats.stores_skipped += len(skipped)
                if not new:
                    return None
        for key in victims:
            self._release(key, from_policy=True)
        if victims:
            self.stats.evictions += len(victims)
            self._record(EventKind.EVICTED, victims)
        slots = []
        for key in new:
            slot = self._take_slot()
            self._entries[key] = _Entry(slot=slot)
            self._writing += 1
            self.policy.insert(key)
            slots.append(slot)
        return StorePlan(tuple(new), tuple(slots), tuple(victims), tuple(skipped))

    def _evict(
        self, n: int, store: Container[OffloadKey], keep: Container[OffloadKey]
    ) -> tuple[list[OffloadKey], int]:
        """Ask the policy for ``n`` victims (or as many as can go); nothing is freed yet.

        Blocks in ``store`` or ``keep`` are not evictable. Returns the checked victims and
        how many they are.
        """
        entries = self._entries

        def evictable(key: OffloadKey) -> bool:
            entry = entries.get(key)
            return (
                entry is not None and entry.readers == 0 and entry.ready and key not in store and key not in keep
            )

        victims = self.policy.evict(n, evictable)
        if victims is None:
            # Not all n can go: count what can (a scan, only on this rare path) and take that.
            n = sum(1 for key in entries if evictable(key))
            victims = self.policy.evict(n, evictable) if n else []
            if victims is None:
                self._policy_error(f"returned None for {n} victims while {n} blocks are evictable", ())
        problem = self._check_victims(victims, n, evictable)
        if problem:
            self._policy_error(problem, victims if isinstance(victims, (list, tuple)) else ())
        return list(victims), len(victims)

    def _check_victims(self, victims: object, n: int, evictable: Callable[[OffloadKey], bool]) -> str | None:
        """What is wrong with a policy's answer (None: nothing)."""
        if not isinstance(victims, (list, tuple)):
            return f"evict() returned {type(victims).__name__}, expected a list of keys or None"
        if len(victims) != n:
            return f"evict({n}) returned {len(victims)} victims"
        try:
            if len(set(victims)) != len(victims):
                return "evict() returned the same key twice"
        except TypeError:
            return "evict() returned something that is not a key"
        for key in victims:
            if not evictable(key):
                what = "unknown" if key not in self._entries else "in use or protected"
                return f"evict() returned block {key!r}, which is {what}"
        return None

    def _policy_error(self, what: str, returned: Sequence[object]) -> NoReturn:
        # The policy already forgot the keys it picked. Give back the blocks the manager still
        # holds, so none becomes impossible to evict: every one the policy no longer lists
        # when it lists its keys (``keys()``), else those it returned.
        if type(self.policy).keys is not EvictionPolicy.keys:
            known = set(self.policy.keys())
            lost = [key for key in self._entries if key not in known]
        else:
            lost = [k for k in dict.fromkeys(k for k in returned if isinstance(k, bytes)) if k in self._entries]
        for key in lost:
            self.policy.insert(key)
        raise PolicyError(f"kv_offload: eviction policy {type(self.policy).__name__} {what}; nothing was evicted")

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
                entry.writing, entry.ready = False, True
                self._writing -= 1
                done.append(key)
            else:
                self._release(key)
        if success:
            self.stats.stores += len(done)
            self.stats.bytes_stored += len(done) * self.block_bytes
            if done:
                self._record(EventKind.STORED, done)
        else:
            self.stats.store_failures += len(keys)

    # -- maintenance ---------------------------------------------------------------------
    def clear(self) -> int:
        """Evict every block not in use (prefix-cache reset). Returns how many went."""
        idle = [k for k, e in self._entries.items() if e.readers == 0 and not e.writing]
        for key in idle:
            self._release(key)
        if idle:
            self.stats.evictions += len(idle)
            self._record(EventKind.EVICTED, idle)
        return len(idle)

    def take_events(self) -> list[OffloadEvent]:
        """Events since the last call (at most ``max_events``; older ones were dropped)."""
        events = list(self._events)
        self._events.clear()
        return events

    # -- internals -----------------------------------------------------------------------
    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._fresh >= self.num_slots:
            raise AssertionError("no free slot left (manager bookkeeping is broken)")
        self._fresh += 1
        return self._fresh - 1

    def _release(self, key: OffloadKey, *, from_policy: bool = False) -> None:
        """Drop ``key`` and free its slot (the policy already forgot victims it returned)."""
        entry = self._entries.pop(key)
        self._free.append(entry.slot)
        self._reading -= entry.readers > 0
        self._writing -= entry.writing
        if not from_policy:
            self.policy.remove(key)

    def _record(self, kind: EventKind, keys: Sequence[OffloadKey]) -> None:
        if len(self._events) == self._events.maxlen:
            self.stats.events_dropped += 1
        self._events.append(OffloadEvent(kind, tuple(keys)))

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (tests, debugging)."""
        slots = [e.slot for e in self._entries.values()]
        free = self._free + list(range(self._fresh, self.num_slots))
        assert len(slots) + len(free) == self.num_slots, "slots leaked or duplicated"
        assert len(set(slots) | set(free)) == self.num_slots, "a slot is owned twice"
        assert all(0 <= s < self._fresh for s in slots + self._free), "a slot beyond the handed-out range"
        for key, entry in self._entries.items():
            assert entry.readers >= 0, f"negative readers on {key.hex()}"
            assert not (entry.writing and entry.readers), f"{key.hex()} read while written"
            assert entry.ready == (not entry.writing and not entry.doomed), f"{key.hex()}: stale ready flag"
            assert not entry.doomed or entry.readers > 0, f"{key.hex()} invalidated but kept with no reader"
        reading = sum(1 for e in self._entries.values() if e.readers)
        writing = sum(1 for e in self._entries.values() if e.writing)
        assert (self._reading, self._writing) == (reading, writing), (
            f"counted {self._reading} reading / {self._writing} writing, found {reading} / {writing}"
        )
