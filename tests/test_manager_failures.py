# SPDX-License-Identifier: Apache-2.0
"""The manager under failures and hostile plug-ins: failed loads, pools smaller than a
prompt, policies that return the wrong victims, and a server that never takes its events."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kv_offload.manager import EventKind, OffloadManager, PolicyError
from kv_offload.policies import EvictionPolicy, OffloadKey
from kv_offload.policies.arc import ARCPolicy
from kv_offload.policies.lru import LRUPolicy


def k(i: int) -> bytes:
    return i.to_bytes(4, "big")


def store(m: OffloadManager, *ids: int) -> None:
    plan = m.prepare_store([k(i) for i in ids])
    assert plan is not None and len(plan.keys) == len(ids)
    m.complete_store(plan.keys)


# -- a failed load takes its blocks out of the index (issue item 9) ----------------------------
def test_failed_load_is_not_offered_again() -> None:
    m = OffloadManager(4, LRUPolicy(4))
    store(m, 1, 2, 3)
    assert m.lookup([k(1), k(2), k(3)]) == 3
    m.prepare_load([k(1), k(2)])
    m.complete_load([k(1), k(2)], success=False)
    # The request that recomputes must not be matched to the same failing load.
    assert m.lookup([k(1), k(2), k(3)]) == 0
    assert not m.contains(k(2)) and m.contains(k(3))
    assert m.num_used == 1 and m.num_free == 3 and m.stats.invalidated == 2
    events = m.take_events()
    assert events[-1].kind is EventKind.INVALIDATED and set(events[-1].keys) == {k(1), k(2)}
    m.check_invariants()
    store(m, 1, 2)  # recomputed blocks can be stored again
    assert m.lookup([k(1), k(2), k(3)]) == 3


def test_failed_load_hides_a_block_another_load_still_reads() -> None:
    m = OffloadManager(2, LRUPolicy(2))
    store(m, 1)
    slot = m.prepare_load([k(1)])
    m.prepare_load([k(1)])  # a second request reads the same block
    m.complete_load([k(1)], success=False)
    assert m.lookup([k(1)]) == 0 and m.index() == {} and m.slot_of(k(1)) is None
    with pytest.raises(KeyError):
        m.prepare_load([k(1)])
    # The slot stays owned while the other load reads it: never reused under a copy.
    plan = m.prepare_store([k(5), k(6)])
    assert plan is not None and plan.keys == (k(5),) and slot[0] not in plan.slots
    m.check_invariants()
    m.complete_load([k(1)])  # the other load ends: now the block is gone
    assert m.num_used == 1 and m.num_free == 1
    m.check_invariants()


def test_successful_load_keeps_the_block() -> None:
    m = OffloadManager(2, LRUPolicy(2))
    store(m, 1)
    m.prepare_load([k(1)])
    m.complete_load([k(1)])
    assert m.lookup([k(1)]) == 1 and m.stats.invalidated == 0


# -- a pool smaller than a prompt keeps the prompt's leading blocks (item 11) ----------------------
def test_pool_smaller_than_a_prompt_stores_the_leading_blocks() -> None:
    m = OffloadManager(1, LRUPolicy(1))
    plan = m.prepare_store([k(i) for i in range(6)])
    assert plan is not None
    assert plan.keys == (k(0),) and plan.skipped == tuple(k(i) for i in range(1, 6))
    assert m.stats.stores_skipped == 5
    m.complete_store(plan.keys)
    assert m.lookup([k(i) for i in range(6)]) == 1


def test_later_blocks_of_a_prompt_never_evict_its_earlier_ones() -> None:
    m = OffloadManager(3, LRUPolicy(3))
    prompt = [k(i) for i in range(8)]
    plan = m.prepare_store(prompt[:2])  # chunked prefill: two blocks a step
    assert plan is not None
    m.complete_store(plan.keys)
    plan = m.prepare_store(prompt[2:4], keep=prompt[:2])
    assert plan is not None and plan.keys == (k(2),) and plan.evicted == ()
    m.complete_store(plan.keys)
    assert m.prepare_store(prompt[4:6], keep=prompt[:4]) is None  # no room left but its own
    assert m.lookup(prompt) == 3  # the usable prefix survived


def test_partial_store_evicts_what_it_can() -> None:
    m = OffloadManager(3, LRUPolicy(3))
    store(m, 1, 2, 3)
    m.prepare_load([k(1)])  # protected
    plan = m.prepare_store([k(7), k(8), k(9)])
    assert plan is not None and plan.keys == (k(7), k(8)) and set(plan.evicted) == {k(2), k(3)}
    assert plan.skipped == (k(9),)
    m.check_invariants()


def test_a_huge_pool_costs_no_memory_per_slot() -> None:
    m = OffloadManager(2**40, LRUPolicy(2**40))  # no list of every slot is built
    store(m, 1, 2)
    assert m.num_free == 2**40 - 2 and m.slot_of(k(1)) == 0 and m.slot_of(k(2)) == 1


# -- a plug-in policy's victims are checked (item 13) ---------------------------------------------
class _Scripted(EvictionPolicy):
    """Returns whatever ``answer(n, evictable)`` says, and tracks nothing else."""

    def __init__(self, answer: Callable[[int, Callable[[OffloadKey], bool]], object]) -> None:
        super().__init__(1)
        self.answer = answer

    def insert(self, key: OffloadKey) -> None: ...
    def touch(self, key: OffloadKey) -> None: ...
    def remove(self, key: OffloadKey) -> None: ...

    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        return self.answer(n, evictable)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("answer", "new", "message"),
    [
        (lambda n, ok: [k(1)], 1, "in use or protected"),  # the block being loaded
        (lambda n, ok: [], 1, r"evict\(1\) returned 0 victims"),  # too few (was IndexError)
        (lambda n, ok: [k(2), k(2)], 2, "same key twice"),
        (lambda n, ok: [k(99)], 1, "unknown"),
        (lambda n, ok: "nope", 1, "expected a list"),
        (lambda n, ok: None, 1, "returned None for 1 victims while 1 blocks are evictable"),
    ],
    ids=["protected", "too-few", "duplicate", "unknown", "not-a-list", "none-when-possible"],
)
def test_bad_policy_answers_raise_and_change_nothing(answer: object, new: int, message: str) -> None:
    m = OffloadManager(3, _Scripted(answer))  # type: ignore[arg-type]
    store(m, 1, 2, 3)
    m.prepare_load([k(3)])
    slots = m.prepare_load([k(1)])
    before = (m.index(), m.num_free, m.num_used)
    with pytest.raises(PolicyError, match=message):
        m.prepare_store([k(10 + i) for i in range(new)])
    assert (m.index(), m.num_free, m.num_used) == before
    assert m.slot_of(k(1)) == slots[0]  # the block being loaded kept its slot
    m.check_invariants()


class _DropsOne(LRUPolicy):
    """A real LRU that, once, forgets to return the last victim it removed (a plug-in bug)."""

    broken = True

    def evict(self, n: int, evictable: Callable[[OffloadKey], bool]) -> list[OffloadKey] | None:
        victims = super().evict(n, evictable)
        if victims and self.broken:
            self.broken = False
            return victims[:-1]
        return victims


def test_policy_error_leaves_no_block_the_policy_forgot() -> None:
    m = OffloadManager(3, _DropsOne(3))
    store(m, 1, 2, 3)
    with pytest.raises(PolicyError, match=r"evict\(2\) returned 1 victims"):
        m.prepare_store([k(4), k(5)])
    assert m.index().keys() == {k(1), k(2), k(3)}
    # Every block the manager holds is still known to the policy: a full turnover evicts
    # them all (before the fix, the two the policy had dropped stayed forever).
    for i in range(10, 20):
        store(m, i)
    assert m.num_used == 3 and not ({k(1), k(2), k(3)} & m.index().keys())
    m.check_invariants()


@pytest.mark.parametrize("policy", [LRUPolicy, ARCPolicy])
def test_builtin_policies_pass_the_checks_under_pressure(policy: type[EvictionPolicy]) -> None:
    m = OffloadManager(4, policy(4))
    for i in range(200):
        plan = m.prepare_store([k(i), k(i + 1), k(i + 2)])
        if plan is not None and plan.keys:
            m.complete_store(plan.keys)
        if i % 3 == 0 and m.lookup([k(i)]):
            m.prepare_load([k(i)])
            m.complete_load([k(i)], success=i % 2 == 0)
        m.check_invariants()


# -- events never grow without bound (item 15) ----------------------------------------------------
def test_events_are_bounded_when_nobody_takes_them() -> None:
    m = OffloadManager(4, LRUPolicy(4), max_events=100)
    for i in range(10_000):
        store(m, i)
    assert m.stats.events_dropped == 10_000 + 9_996 - 100  # stored and evicted events, less those kept
    events = m.take_events()
    assert len(events) == 100 and events[-1].kind is EventKind.STORED and events[-1].keys == (k(9999),)
    assert m.take_events() == []


def test_default_event_bound_holds_over_a_long_run() -> None:
    m = OffloadManager(8, LRUPolicy(8))
    for i in range(20_000):
        store(m, i)
    assert len(m.take_events()) == 4096 and m.stats.events_dropped == 20_000 + 19_992 - 4096
