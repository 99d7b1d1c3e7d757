# SPDX-License-Identifier: Apache-2.0
"""A block the disk tier has evicted is not offered from the disk tier (found by the soak).

The scheduler half remembers the blocks its workers wrote to a lower tier
(``LowerTier.written``, so that a block is offered before the tier's index has caught up),
for up to 1024 blocks; a disk tier smaller than that evicts blocks (LRU) that the record
still lists. The soak (``benchmarks/soak.py``: a 128-block disk tier) saw hundreds of
promotions fail with "k of k blocks not read" and its isolation check's remote stage
recompute instead of hitting Redis, which held the blocks. Real files, real copies."""

from __future__ import annotations

import os
import threading
from typing import Any

from halves_helpers import BS, GEOM, FakeRequest, make_layers, run_until_settled, settle, step

from kv_offload.config import OffloadConfig
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.transfer.tier_io import TierOp
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf, open_disk_tier

DISK_BLOCKS = 6


def _full_disk_halves(tmp_path: os.PathLike[str]) -> tuple[Any, SchedulerHalf, WorkerHalf]:
    """A 4-slot pool over a DISK_BLOCKS-block disk tier (the scheduler's index and a worker)."""
    cfg = OffloadConfig.from_dict({"cpu_bytes": 4 * GEOM.slot_bytes, "sync_load_max_bytes": 0,
                                   "disk": {"path": str(tmp_path), "bytes": DISK_BLOCKS * GEOM.slot_bytes}})  # fmt: skip
    index = open_disk_tier(cfg.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(cfg, OffloadManager(4, LRUPolicy(4)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(cfg, GEOM, namespace=b"n" * 16)
    worker.register(make_layers())
    return index, half, worker


def _store_one(half: SchedulerHalf, worker: WorkerHalf, r: FakeRequest) -> None:
    """``r``'s one block stored into the pool and written through to the disk."""
    half.on_alloc(r, [0], 0)
    step(half, worker, [ScheduledRequest(r, 0, BS, [0])])
    run_until_settled(half, worker)
    half.on_finished(r)


def test_an_evicted_disk_block_is_not_offered_from_disk(tmp_path: os.PathLike[str]) -> None:
    index, half, worker = _full_disk_halves(tmp_path)
    try:
        # Three times more distinct blocks than the disk holds, each request stored and
        # written through to disk before the next.
        requests = [FakeRequest(f"r{i}", [1000 * i + t for t in range(2 * BS)]) for i in range(3 * DISK_BLOCKS // 2)]
        for r in requests:
            half.on_alloc(r, [0, 1], 0)
            step(half, worker, [ScheduledRequest(r, 0, 2 * BS, [0, 1])])
            run_until_settled(half, worker)
            half.on_finished(r)
        assert half.take_counters().written_back_blocks == len(requests) * 2
        # The connector's background refresher re-reads the worker's segments every few
        # seconds; from then on the scheduler's index, not its record, says what is there.
        index.refresh()  # type: ignore[attr-defined]
        first = FakeRequest("again", requests[0].prompt + [7])
        offered, _ = half.match(first, 0)
        # What the disk really holds of the first request's blocks (the pool, 4 slots, has
        # long dropped them): the scheduler may offer no more than that.
        held = index.contains(half.block_keys(first, 2))  # type: ignore[attr-defined]
        assert held is not None
        # And what is offered is read: the promotion succeeds rather than failing and
        # making the request recompute.
        if offered:
            half.on_alloc(first, [2, 3, 4], offered)
            step(half, worker, [])
            run_until_settled(half, worker)
            counters = half.take_counters()
            assert (counters.failed_promotes, counters.promoted_blocks) == (0, offered // BS), (offered, held)
        assert (offered or 0) <= BS * _leading(held), (offered, held)
    finally:
        worker.shutdown()
        index.close()  # type: ignore[attr-defined]


def _leading(flags: list[bool]) -> int:
    n = 0
    while n < len(flags) and flags[n]:
        n += 1
    return n


def test_before_any_refresh_the_record_keeps_no_more_blocks_than_the_disk_holds(tmp_path: os.PathLike[str]) -> None:
    """Between two refreshes only the record speaks for the worker's writes. It keeps the
    disk's own LRU order (written or promoted last = evicted last) and at most the disk's
    capacity: the blocks written before the last DISK_BLOCKS are gone from the disk, and
    offering them made the promotion fail and the request recompute."""
    index, half, worker = _full_disk_halves(tmp_path)
    try:
        requests = [FakeRequest(f"r{i}", [1000 * i + t for t in range(BS)]) for i in range(DISK_BLOCKS + 2)]
        for r in requests:
            _store_one(half, worker, r)
            if r is requests[4]:  # the pool (4 slots) dropped r0; promoting it touches it on disk
                again = FakeRequest("touch", requests[0].prompt + [7])
                assert half.match(again, 0)[0] == BS
                half.on_alloc(again, [1, 2], BS)
                step(half, worker, [])
                run_until_settled(half, worker)
                half.on_finished(again)
        counters = half.take_counters()
        assert counters.written_back_blocks == len(requests) and counters.promoted_blocks == 1
        assert counters.failed_promotes == 0
        record = half.tiers["disk"].written
        assert len(record) == DISK_BLOCKS, len(record)
        # No refresh: what the record offers is exactly what the disk still holds.
        keys = [half.block_keys(FakeRequest(f"q{i}", r.prompt + [7]), 1)[0] for i, r in enumerate(requests)]
        on_disk = worker.tiers["disk"].contains(keys)
        assert [k in record for k in keys] == on_disk, on_disk
        # r0 was promoted after r1 to r4 were written: it outlived r1 and r2 on the disk.
        assert on_disk[:3] == [True, False, False], on_disk
    finally:
        worker.shutdown()
        index.close()  # type: ignore[attr-defined]


def test_a_block_our_writes_evicted_since_the_last_refresh_is_not_offered(tmp_path: os.PathLike[str]) -> None:
    """The index re-read the tier when it held a block; the worker's own write-backs then
    evicted it (the disk is full and LRU). Until the next refresh the index still lists it:
    the scheduler knows better from its record, and offers it no more."""
    index, half, worker = _full_disk_halves(tmp_path)
    try:
        requests = [FakeRequest(f"r{i}", [1000 * i + t for t in range(BS)]) for i in range(DISK_BLOCKS + 2)]
        for i, r in enumerate(requests):
            _store_one(half, worker, r)
            if i == DISK_BLOCKS - 1:
                index.refresh()  # type: ignore[attr-defined]  # the disk is full: r0 to r5
        keys = [half.block_keys(FakeRequest(f"q{i}", r.prompt + [7]), 1)[0] for i, r in enumerate(requests)]
        assert worker.tiers["disk"].contains(keys) == [False, False] + [True] * DISK_BLOCKS
        assert index.contains(keys[:2]) == [True, True]  # type: ignore[attr-defined]  # not re-read yet
        for i in (0, 1):  # evicted by r6 and r7: not offered (the pool, 4 slots, dropped them too)
            assert half.match(FakeRequest(f"a{i}", requests[i].prompt + [7]), 0) == (0, False)
        again = FakeRequest("a2", requests[2].prompt + [7])  # on the disk, listed since the refresh
        assert half.match(again, 0) == (BS, True)
        half.on_alloc(again, [1, 2], BS)
        step(half, worker, [])
        run_until_settled(half, worker)
        counters = half.take_counters()
        assert (counters.promoted_blocks, counters.failed_promotes) == (1, 0)
        index.refresh()  # type: ignore[attr-defined]  # from now on the index says so itself
        assert index.contains(keys[:2]) == [False, False]  # type: ignore[attr-defined]
        assert half.match(FakeRequest("a0b", requests[0].prompt + [7]), 0) == (0, False)
    finally:
        worker.shutdown()
        index.close()  # type: ignore[attr-defined]


def test_a_block_a_running_write_back_evicts_is_never_offered(tmp_path: os.PathLike[str]) -> None:
    """The disk is full and a write-back has run on the worker, removing the least recently
    used block to make room, but the scheduler has not heard of it yet. A request for that
    block arrives meanwhile: it is not offered, because the scheduler chose that eviction
    when it planned the write-back; a block still there is offered and read. (Before, the
    record learnt of a write only when it settled, and the tier chose its own evictions: the
    block was offered and its promotion failed, about 1 run in 16 of the halves soak.)"""
    index, half, worker = _full_disk_halves(tmp_path)
    try:
        requests = [FakeRequest(f"r{i}", [1000 * i + t for t in range(BS)]) for i in range(DISK_BLOCKS + 1)]
        for r in requests[:DISK_BLOCKS]:
            _store_one(half, worker, r)  # the disk is full: r0 to r5
        half.take_counters()
        keys = [half.block_keys(FakeRequest(f"q{i}", r.prompt + [7]), 1)[0] for i, r in enumerate(requests)]
        last = requests[DISK_BLOCKS]
        half.on_alloc(last, [0], 0)
        step(half, worker, [ScheduledRequest(last, 0, BS, [0])])
        half.on_report(settle(worker, 1))  # the store settles: its write-back is planned next step
        half.on_finished(last)
        plan = step(half, worker, [])
        assert [job.keys for job in plan.writebacks] == [(keys[DISK_BLOCKS],)]
        assert [job.evict for job in plan.writebacks] == [(keys[0],)]  # least recently written
        worker._tier_io["disk"].wait_all()  # it ran; its report is not taken
        assert worker.tiers["disk"].contains(keys) == [False] + [True] * DISK_BLOCKS
        # The pool (4 slots) dropped r0 and r1 long ago: only the disk could supply them.
        assert half.match(FakeRequest("a0", requests[0].prompt + [7]), 0) == (0, False)
        again = FakeRequest("a1", requests[1].prompt + [7])
        assert half.match(again, 0) == (BS, True)
        half.on_alloc(again, [1, 2], BS)
        step(half, worker, [])
        run_until_settled(half, worker)
        counters = half.take_counters()
        assert (counters.promoted_blocks, counters.failed_promotes, counters.written_back_blocks) == (1, 0, 1)
        # Settled: the record is what the disk holds, r1 (promoted) now the most recent.
        record = half.tiers["disk"].written
        assert list(record) == keys[2 : DISK_BLOCKS + 1] + [keys[1]]
        assert worker.tiers["disk"].contains(keys) == [False] + [True] * DISK_BLOCKS
    finally:
        worker.shutdown()
        index.close()  # type: ignore[attr-defined]


def test_a_write_back_waits_rather_than_evict_a_block_being_promoted(tmp_path: os.PathLike[str]) -> None:
    """The only block a full disk could give up is being promoted: the write-back that
    needs its room is not planned (its block stays pinned in the pool) until the promotion
    settles; removing it would have failed the promotion."""
    cfg = OffloadConfig.from_dict({"cpu_bytes": 4 * GEOM.slot_bytes, "sync_load_max_bytes": 0,
                                   "disk": {"path": str(tmp_path), "bytes": GEOM.slot_bytes}})  # fmt: skip
    index = open_disk_tier(cfg.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(cfg, OffloadManager(4, LRUPolicy(4)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(cfg, GEOM, namespace=b"n" * 16)
    worker.register(make_layers())
    reading = threading.Event()
    go = threading.Event()

    def stall_reads(job_id: int, op: TierOp) -> None:
        if op is TierOp.READ:
            reading.set()
            assert go.wait(10)

    try:
        first, second = (FakeRequest(f"r{i}", [1000 * i + t for t in range(BS)]) for i in range(2))
        _store_one(half, worker, first)  # the disk's one block
        keys = [half.block_keys(FakeRequest(f"q{i}", r.prompt + [7]), 1)[0] for i, r in enumerate((first, second))]
        assert half.manager.clear() == 1  # the pool drops it: only the disk has it
        worker._tier_io["disk"].fault_hook = stall_reads
        again = FakeRequest("again", first.prompt + [7])
        assert half.match(again, 0) == (BS, True)
        half.on_alloc(again, [1, 2], BS)
        half.on_alloc(second, [3], 0)
        step(half, worker, [ScheduledRequest(second, 0, BS, [3])])  # the promotion, and r1's store
        assert reading.wait(10)
        half.on_report(settle(worker, 1))  # the store settles; the promotion is still reading
        half.on_finished(second)
        for _ in range(3):
            assert half.build_plan([]).writebacks == ()  # r1 waits, pinned in the pool
        assert worker.tiers["disk"].contains(keys) == [True, False]
        go.set()
        run_until_settled(half, worker)  # the promotion settles, then r1 is written back
        counters = half.take_counters()
        assert (counters.promoted_blocks, counters.failed_promotes, counters.written_back_blocks) == (1, 0, 2)
        assert worker.tiers["disk"].contains(keys) == [False, True]
        assert list(half.tiers["disk"].written) == [keys[1]]
        half.on_finished(again)
    finally:
        go.set()
        worker.shutdown()
        index.close()  # type: ignore[attr-defined]
