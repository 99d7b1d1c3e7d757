# SPDX-License-Identifier: Apache-2.0
"""The scheduler's record of a lower tier with a known capacity (the disk): it chooses the
write-backs' evictions, so it must never count fewer blocks than the tier holds of ours (the
tier would then evict by itself, perhaps a block the scheduler has just offered), and never
offer a block it is not sure of. Pure bookkeeping: the end-to-end checks on a real disk tier
are in ``tests/test_stale_disk_writes.py`` and the halves soak."""

from __future__ import annotations

from collections.abc import Sequence

from kv_offload.vllm.lower_tiers import PENDING, LowerTier

BOUND = 1024


class _Index:
    """A disk index that never re-read the tier: the record alone speaks."""

    refreshed_at = 0.0

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [False] * len(keys)


def _k(i: int) -> bytes:
    return i.to_bytes(4, "little") * 4


def _offered(tier: LowerTier, keys: Sequence[bytes]) -> list[bool]:
    return [tier.ours(k) and not tier.refuses(k) and not tier.evicted(k) for k in keys]


def _filled(capacity: int) -> LowerTier:
    tier = LowerTier("disk", _Index(capacity))
    keys = [_k(i) for i in range(capacity)]
    take, victims = tier.plan_write(keys, busy=())
    assert (take, victims) == (keys, [])
    tier.settle_write(keys, (), True, 1.0, BOUND)
    return tier


def test_a_write_back_to_a_full_tier_evicts_the_least_recently_used_that_no_promotion_reads() -> None:
    tier = _filled(4)
    tier.read([_k(0)])  # promoted: now the most recently used
    take, victims = tier.plan_write([_k(10), _k(11)], busy={_k(1)})
    assert (take, victims) == ([_k(10), _k(11)], [_k(2), _k(3)])
    assert list(tier.written) == [_k(1), _k(0), _k(10), _k(11)]
    assert tier.written[_k(10)] == PENDING and tier.gone[_k(2)] == PENDING
    # The evictions are never offered, however the index looks, until the write-back settles.
    tier.index.refreshed_at = 50.0  # type: ignore[attr-defined]
    assert _offered(tier, [_k(2), _k(3)]) == [False, False]
    tier.settle_write([_k(10), _k(11)], [_k(2), _k(3)], True, 2.0, BOUND)
    assert tier.gone[_k(2)] == 2.0 and tier.written[_k(10)] == 2.0


def test_blocks_that_find_no_room_wait_rather_than_evict_a_block_being_promoted() -> None:
    tier = _filled(2)
    take, victims = tier.plan_write([_k(10), _k(11)], busy={_k(0)})
    assert (take, victims) == ([_k(10)], [_k(1)])
    assert len(tier.written) == 2
    take, victims = tier.plan_write([_k(11)], busy={_k(0), _k(10)})
    assert (take, victims) == ([], [])


def test_a_failed_promotion_keeps_its_block_counted_but_never_offers_it_until_written_anew() -> None:
    tier = _filled(3)
    tier.read_failed([_k(1)], BOUND)
    assert _k(1) in tier.written and _offered(tier, [_k(0), _k(1), _k(2)]) == [True, False, True]
    # Written anew from a good pool copy: counted once, offered again once it settled.
    take, victims = tier.plan_write([_k(1)], busy=())
    assert (take, victims) == ([_k(1)], [])
    tier.settle_write([_k(1)], (), True, 2.0, BOUND)
    assert list(tier.written) == [_k(0), _k(2), _k(1)] and _offered(tier, [_k(1)]) == [True]


def test_a_failed_write_back_keeps_everything_it_may_have_touched_counted_and_offers_none() -> None:
    tier = _filled(3)
    take, victims = tier.plan_write([_k(10)], busy=())
    assert (take, victims) == ([_k(10)], [_k(0)])
    tier.settle_write(take, victims, False, 2.0, BOUND)
    # It may have removed k0 or not, written k10 or not: both counted, neither offered, and
    # k0 is the next eviction.
    assert list(tier.written) == [_k(0), _k(1), _k(2), _k(10)]
    assert _offered(tier, [_k(0), _k(1), _k(2), _k(10)]) == [False, True, True, False]
    take, victims = tier.plan_write([_k(11)], busy=())
    assert (take, victims) == ([_k(11)], [_k(0), _k(1)])


def test_without_a_capacity_the_record_learns_of_writes_when_they_settle() -> None:
    tier = LowerTier("remote", _NoCapacity())
    assert tier.plan_write([_k(1)], busy=()) == ([_k(1)], [])
    assert not tier.written
    tier.settle_write([_k(1)], (), True, 1.0, BOUND)
    assert list(tier.written) == [_k(1)]
    tier.read_failed([_k(1)], BOUND)
    assert not tier.written and tier.refuses(_k(1))


class _NoCapacity:
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [True] * len(keys)


def test_a_record_past_capacity_shrinks_only_by_planned_evictions() -> None:
    """A failed write-back leaves the record past the tier's capacity; another write-back
    settling meanwhile must not drop blocks from it without evicting them (they would still
    take room on the tier): the next plan evicts the excess."""
    tier = _filled(3)
    first = tier.plan_write([_k(10)], busy=())
    second = tier.plan_write([_k(11)], busy=())
    assert (first, second) == (([_k(10)], [_k(0)]), ([_k(11)], [_k(1)]))
    tier.settle_write(*first, False, 2.0, BOUND)  # cancelled: k0 may still be there
    tier.settle_write(*second, True, 3.0, BOUND)
    assert list(tier.written) == [_k(0), _k(2), _k(10), _k(11)]
    assert tier.plan_write([_k(12)], busy=()) == ([_k(12)], [_k(0), _k(2)])
