# SPDX-License-Identifier: Apache-2.0
"""Random operation sequences against the manager, checked against a plain model.

Checked after every step: capacity never exceeded, no block evicted while it is read or
written, lookups agree with what was stored (and not evicted or invalidated by a failed
load since), slots never shared, a store that does not fit reserves exactly the leading
blocks that room can be made for.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kv_offload.manager import OffloadManager
from kv_offload.policies import POLICIES

KEYS = [bytes([i]) * 8 for i in range(14)]
key_lists = st.lists(st.sampled_from(KEYS), min_size=1, max_size=6)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager: OffloadManager | None = None
        self.ready: set[bytes] = set()
        self.writing: list[tuple[bytes, ...]] = []  # outstanding stores (keys reserved together)
        self.reading: list[tuple[bytes, ...]] = []  # outstanding loads
        self.slots: dict[bytes, int] = {}
        self.offers: dict[bytes, int] = {}  # the admission counter's model
        self.doomed: set[bytes] = set()  # a load failed, another load still reads them

    @initialize(policy=st.sampled_from(POLICIES.names()), num_slots=st.integers(1, 8),
                threshold=st.sampled_from([0, 0, 2]))  # fmt: skip
    def setup(self, policy: str, num_slots: int, threshold: int) -> None:
        self.threshold = threshold
        self.manager = OffloadManager(
            num_slots, POLICIES.resolve(policy)(num_slots), block_bytes=100, store_threshold=threshold
        )

    @property
    def m(self) -> OffloadManager:
        assert self.manager is not None
        return self.manager

    def busy(self) -> set[bytes]:
        return {k for keys in self.writing + self.reading for k in keys}

    def in_flight_writes(self) -> set[bytes]:
        return {k for keys in self.writing for k in keys}

    @rule(keys=key_lists)
    def lookup(self, keys: list[bytes]) -> None:
        expected = 0
        for k in keys:
            if k not in self.ready:
                break
            expected += 1
        assert self.m.lookup(keys) == expected

    @rule(keys=key_lists)
    def prepare_store(self, keys: list[bytes]) -> None:
        used_before = self.m.num_used
        protected = self.busy()
        offered = [k for k in dict.fromkeys(keys) if k not in self.slots]
        if self.threshold < 2:
            expected_new = offered
        else:
            # Admission: a key is stored on its threshold-th offer; other offers count.
            expected_new = [k for k in offered if self.offers.get(k, 0) + 1 >= self.threshold]
            for k in offered:
                self.offers[k] = self.offers.get(k, 0) + 1
        # Room: free slots plus ready blocks nobody uses that are not part of this store.
        evictable = self.ready - protected - set(keys)
        fit = min(len(expected_new), self.m.num_slots - len(self.slots) + len(evictable))
        plan = self.m.prepare_store(keys)
        if plan is None:
            # "Cannot store": nothing may have changed, and the refused keys stay admitted.
            assert self.m.num_used == used_before
            assert expected_new and fit == 0
            return
        assert list(plan.keys) == expected_new[:fit], "not the leading blocks that fit"
        assert list(plan.skipped) == expected_new[fit:]
        for k in plan.keys:
            self.offers.pop(k, None)
        assert set(plan.evicted).isdisjoint(protected), "evicted a block being read or written"
        assert set(plan.evicted).isdisjoint(keys), "evicted a block of the store itself"
        assert set(plan.evicted) <= self.ready
        for k in plan.evicted:
            self.ready.discard(k)
            self.slots.pop(k)
        for k in plan.keys:
            assert k not in self.ready and k not in self.in_flight_writes()
            assert k in keys
        assert len(set(plan.slots)) == len(plan.slots)
        assert set(plan.slots).isdisjoint(self.slots.values()), "slot handed out twice"
        for k, s in zip(plan.keys, plan.slots):
            self.slots[k] = s
        if plan.keys:
            self.writing.append(plan.keys)

    @precondition(lambda self: bool(self.writing))
    @rule(index=st.integers(0, 100), success=st.booleans())
    def complete_store(self, index: int, success: bool) -> None:
        keys = self.writing.pop(index % len(self.writing))
        self.m.complete_store(keys, success=success)
        for k in keys:
            if success:
                self.ready.add(k)
            else:
                self.slots.pop(k)

    @rule(keys=key_lists)
    def prepare_load(self, keys: list[bytes]) -> None:
        n = self.m.lookup(keys)
        if n == 0:
            return
        hit = tuple(keys[:n])
        slots = self.m.prepare_load(hit)
        assert slots == [self.slots[k] for k in hit]
        self.reading.append(hit)

    @precondition(lambda self: bool(self.reading))
    @rule(index=st.integers(0, 100), success=st.booleans())
    def complete_load(self, index: int, success: bool) -> None:
        keys = self.reading.pop(index % len(self.reading))
        self.m.complete_load(keys, success=success)
        if not success:
            # A failed load takes its blocks out of the index, at once for lookups...
            self.doomed.update(keys)
            self.ready.difference_update(keys)
        still_read = {k for hit in self.reading for k in hit}
        for k in list(self.doomed):
            if k not in still_read:  # ...and out of the pool once nobody reads them
                self.doomed.discard(k)
                self.slots.pop(k)

    @rule(keys=key_lists)
    def touch(self, keys: list[bytes]) -> None:
        self.m.touch(keys)

    @rule()
    def clear(self) -> None:
        busy = self.busy()
        self.m.clear()
        for k in list(self.ready | self.doomed):
            if k not in busy:
                self.ready.discard(k)
                self.slots.pop(k)

    @invariant()
    def consistent(self) -> None:
        if self.manager is None:
            return
        m = self.m
        m.check_invariants()
        assert m.num_used <= m.num_slots
        assert m.num_used == len(self.slots)
        assert {k for k in KEYS if m.contains(k)} == self.ready
        for k in self.busy():
            assert k in self.slots, "a block in use was evicted"


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(
    max_examples=1000,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
