# SPDX-License-Identifier: Apache-2.0
"""The scheduler's view of a full lower tier while write-backs are in flight
(:meth:`kv_offload.vllm.lower_tiers.LowerTier.at_risk`): blocks a write-back not settled yet
may evict are not offered until it settles."""

from __future__ import annotations

from collections.abc import Sequence

from kv_offload.vllm.lower_tiers import LowerTier


class _Index:
    """A tier index that holds every key (the record decides) and knows its capacity."""

    def __init__(self, capacity_blocks: int | None) -> None:
        self.capacity_blocks = capacity_blocks
        self.refreshed_at = 0.0

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [True] * len(keys)


def _key(i: int) -> bytes:
    return bytes([i]) * 16


def _tier(capacity: int | None = 8) -> LowerTier:
    tier = LowerTier("disk", _Index(capacity))
    tier.wrote([_key(i) for i in range(6)], now=1.0, bound=100)  # least recently written first
    return tier


def test_the_front_of_the_record_is_at_risk_only_while_a_write_back_is_in_flight() -> None:
    tier = _tier()
    assert not any(tier.at_risk(_key(i)) for i in range(6))
    tier.flight(True, 2)  # a write-back of 2 blocks planned: it may evict the 2 oldest
    assert [tier.at_risk(_key(i)) for i in range(6)] == [True, True, False, False, False, False]
    tier.flight(False, 1)  # a promotion in flight may move one of those behind: one more
    assert [tier.at_risk(_key(i)) for i in range(6)] == [True, True, True, False, False, False]
    tier.read([_key(0)])  # a settled promotion: block 0 is the most recently used now
    assert [tier.at_risk(_key(i)) for i in range(6)] == [False, True, True, True, False, False]
    tier.flight(False, -1)
    tier.flight(True, -2)  # both settled
    assert not any(tier.at_risk(_key(i)) for i in range(6))


def test_blocks_the_record_dropped_are_at_risk_while_a_write_back_is_in_flight() -> None:
    tier = _tier()
    tier.wrote([_key(i) for i in range(6, 10)], now=2.0, bound=100)  # 10 > 8: blocks 0 and 1 dropped
    assert _key(0) in tier.gone and _key(0) not in tier.written
    assert not tier.at_risk(_key(0))  # nothing in flight: the index decides
    tier.flight(True, 1)
    assert tier.at_risk(_key(0)) and tier.at_risk(_key(1)) and tier.at_risk(_key(2))
    assert not tier.at_risk(_key(3))


def test_a_tier_without_a_known_capacity_never_holds_blocks_back() -> None:
    tier = _tier(capacity=None)
    tier.flight(True, 4)
    assert not any(tier.at_risk(_key(i)) for i in range(6))
