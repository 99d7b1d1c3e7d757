# SPDX-License-Identifier: Apache-2.0
"""A hypothesis state machine over the disk tier's index against a plain model: writes (which
evict past capacity), reads, removes, restarts, and a crash at every step of a write."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from disk_tier_helpers import body, key, read_back, tier, write
from kv_offload.tiers.disk import DiskTier
from kv_offload.tiers.disk.segment import FaultHook

CAPACITY = 8  # two segments of four slots
POOL = [key(i) for i in range(14)]
STEPS = ["begin", "cleared", "body_half", "body", "committed"]
keys_st = st.lists(st.sampled_from(POOL), min_size=1, max_size=5)


class Crash(Exception):
    """Raised by the fault hook: the write stops there, as if the process died."""


class DiskTierMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="kvo-state-")
        self.crash_at: list[str] = []
        self.t = self._open()
        self.stored: set[bytes] = set()  # the model: what the tier holds
        self.evictions = 0

    def _hook(self, step: str) -> None:
        if self.crash_at and self.crash_at[0] == step:
            raise Crash(step)

    def _open(self) -> DiskTier:
        hook: FaultHook = self._hook
        return tier(self.root, blocks=CAPACITY, threads=1, segment_bytes=4 * 8192, fault_hook=hook)

    def _held(self) -> set[bytes]:
        return {k for k, c in zip(POOL, self.t.contains(POOL)) if c}

    @rule(ks=keys_st)
    def do_write(self, ks: list[bytes]) -> None:
        before = self.t.stats().evictions
        res = write(self.t, ks)
        fresh = {k for k in ks if k not in self.stored}
        assert all(r for k, r in zip(ks, res) if k in self.stored)  # held keys are only touched
        assert all(res) == (len(fresh) <= CAPACITY)
        held = self._held()
        evicted = self.stored - held
        assert self.t.stats().evictions - before == len(evicted)
        assert held - self.stored == {k for k, r in zip(ks, res) if r and k in fresh}
        self.stored = held

    @rule(ks=keys_st)
    def do_read(self, ks: list[bytes]) -> None:
        ok, outs = read_back(self.t, ks)
        assert ok == [k in self.stored for k in ks]
        assert all(bytes(o) == body(k) for o, k, g in zip(outs, ks, ok) if g)

    @rule(ks=keys_st)
    def do_remove(self, ks: list[bytes]) -> None:
        res = self.t.remove(ks)
        seen: set[bytes] = set()
        for k, r in zip(ks, res):
            assert r == (k in self.stored and k not in seen)
            seen.add(k)
        self.stored -= set(ks)

    @rule()
    def restart(self) -> None:
        self.t.close()
        self.t = self._open()
        assert self._held() == self.stored
        assert self.t.stats().index_blocks == len(self.stored)

    @precondition(lambda self: len(self.stored) < len(POOL))
    @rule(step=st.sampled_from(STEPS), data=st.data())
    def crash_during_write(self, step: str, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(set(POOL) - self.stored)))
        self.crash_at[:] = [step]
        try:
            write(self.t, [k])
            raise AssertionError("the fault hook did not stop the write")
        except Crash:
            pass
        finally:
            self.crash_at.clear()
        self.t.abandon()  # the process is gone: descriptors and locks with it, nothing written
        self.t = self._open()
        held = self._held()
        assert held <= self.stored | {k}
        assert (k in held) == (step == "committed")
        assert len(self.stored - held) <= 1  # at most the one block evicted for it
        ok, outs = read_back(self.t, sorted(held))
        assert all(ok) and all(bytes(o) == body(x) for o, x in zip(outs, sorted(held)))
        self.stored = held

    @invariant()
    def bounded_and_counted(self) -> None:
        assert len(self.stored) <= CAPACITY
        assert self.t.stats().blocks == len(self.stored)

    def teardown(self) -> None:
        self.t.close()
        shutil.rmtree(self.root, ignore_errors=True)


DiskTierMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_disk_tier_state_machine = DiskTierMachine.TestCase
