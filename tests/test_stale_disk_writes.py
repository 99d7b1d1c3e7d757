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

from halves_helpers import BS, GEOM, FakeRequest, make_layers, run_until_settled, step

from kv_offload.config import OffloadConfig
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf, open_disk_tier

DISK_BLOCKS = 6


def test_an_evicted_disk_block_is_not_offered_from_disk(tmp_path: os.PathLike[str]) -> None:
    cfg = OffloadConfig.from_dict({"cpu_bytes": 4 * GEOM.slot_bytes, "sync_load_max_bytes": 0,
                                   "disk": {"path": str(tmp_path), "bytes": DISK_BLOCKS * GEOM.slot_bytes}})  # fmt: skip
    index = open_disk_tier(cfg.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(cfg, OffloadManager(4, LRUPolicy(4)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(cfg, GEOM, namespace=b"n" * 16)
    worker.register(make_layers())
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
