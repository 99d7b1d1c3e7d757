# SPDX-License-Identifier: Apache-2.0
"""TierIO: reads and writes run on their own threads (a read never waits for a write-back,
nor a write for reads), over a real disk tier, with the data checked both ways."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_offload.tiers.disk import DiskTier
from kv_offload.transfer.tier_io import TierIO, TierOp, TierResult

BLOCK = 8192
SLOTS = 32


class _Gate:
    """A fault hook that holds the first job to start in the tier until :meth:`open`, and
    records the order jobs start in."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self._open = threading.Event()
        self._first = threading.Event()

    def __call__(self, job_id: int, op: TierOp) -> None:
        self.started.append(job_id)
        if len(self.started) == 1:
            self._first.set()
            assert self._open.wait(10), "the gate was never opened"

    def wait_first(self) -> None:
        assert self._first.wait(10)

    def open(self) -> None:
        self._open.set()


Setup = tuple[DiskTier, torch.Tensor, TierIO, _Gate]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    tier = DiskTier(str(tmp_path), 64 * BLOCK, b"n" * 16, BLOCK, threads=1)
    pool = torch.arange(SLOTS * BLOCK, dtype=torch.int64).remainder(251).to(torch.uint8).view(SLOTS, BLOCK)
    io = TierIO(tier, pool)
    gate = _Gate()
    io.fault_hook = gate
    yield tier, pool, io, gate
    io.shutdown()
    tier.close()


def _key(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def _done(io: TierIO) -> dict[int, TierResult]:
    io.wait_all()
    return {r.job_id: r for r in io.poll()}


def _wait_for(io: TierIO, job_id: int, seen: dict[int, TierResult]) -> TierResult:
    """Poll until ``job_id`` ended; every result polled meanwhile goes into ``seen``."""
    deadline = time.monotonic() + 10
    while job_id not in seen and time.monotonic() < deadline:
        seen.update((r.job_id, r) for r in io.poll())
        time.sleep(0.001)
    assert job_id in seen, f"job {job_id} never ended"
    return seen[job_id]


def test_a_read_runs_while_writes_are_blocked_in_the_tier(setup: Setup) -> None:
    tier, pool, io, gate = setup
    stored = torch.full((BLOCK,), 7, dtype=torch.uint8)
    assert tier.write([(_key(100), stored.numpy().data)]) == [True]
    before = pool.clone()
    io.write(1, [_key(1)], [1])  # held in the tier
    gate.wait_first()
    io.write(2, [_key(2)], [2])
    io.write(3, [_key(3), _key(4)], [3, 4])
    io.read(4, [_key(100)], [20])
    seen: dict[int, TierResult] = {}
    assert _wait_for(io, 4, seen).success  # while write 1 is still held
    assert gate.started == [1, 4]
    gate.open()
    done = {**seen, **_done(io)}
    assert gate.started == [1, 4, 2, 3]  # the writes in submission order
    assert all(r.success for r in done.values()) and done[4].op is TierOp.READ
    # The read put the tier's block in its slot and nothing else; the writes stored theirs.
    assert torch.equal(pool[20], stored)
    untouched = [s for s in range(SLOTS) if s != 20]
    assert torch.equal(pool[untouched], before[untouched])
    back = torch.zeros(4, BLOCK, dtype=torch.uint8)
    views = [back[i].numpy().data for i in range(4)]
    assert tier.read([_key(1), _key(2), _key(3), _key(4)], views) == [True] * 4
    assert torch.equal(back, pool[1:5])


def test_a_write_runs_while_a_read_is_blocked_in_the_tier(setup: Setup) -> None:
    tier, pool, io, gate = setup
    stored = torch.full((BLOCK,), 3, dtype=torch.uint8)
    assert tier.write([(_key(200), stored.numpy().data)]) == [True]
    io.read(1, [_key(200)], [8])  # held in the tier
    gate.wait_first()
    io.read(2, [_key(200)], [9])
    io.write(3, [_key(3)], [3])
    seen: dict[int, TierResult] = {}
    assert _wait_for(io, 3, seen).success  # while read 1 is still held: write-backs are never starved
    gate.open()
    done = {**seen, **_done(io)}
    assert gate.started == [1, 3, 2]
    assert all(r.success for r in done.values())
    assert torch.equal(pool[8:10], stored.expand(2, BLOCK))


def test_a_cancelled_write_never_runs_and_shutdown_finishes_what_was_queued(setup: Setup) -> None:
    tier, _, io, gate = setup
    io.write(1, [_key(1)], [1])
    gate.wait_first()
    io.write(2, [_key(2)], [2])
    io.read(3, [_key(999)], [5])  # a miss: fails, touches nothing it should not
    assert io.cancel([1, 2]) == {2}  # 1 is running
    gate.open()
    io.shutdown()
    done = {r.job_id: r for r in io.poll()}
    assert sorted(done) == [1, 2, 3]
    assert done[1].success and not done[2].success and not done[3].success
    assert gate.started == [1, 3]  # the cancelled write never reached the tier
    assert tier.contains([_key(1), _key(2)]) == [True, False]
    io.shutdown = lambda: None  # type: ignore[method-assign]  # the fixture's, already done


def test_a_read_and_a_write_running_at_once_cannot_be_cancelled(setup: Setup) -> None:
    """Both are in the tier, reading or writing their slots; a write queued behind can be."""
    tier, pool, io, _ = setup
    stored = torch.full((BLOCK,), 9, dtype=torch.uint8)
    assert tier.write([(_key(300), stored.numpy().data)]) == [True]
    reached = {1: threading.Event(), 2: threading.Event()}
    release = threading.Event()

    def hold(job_id: int, op: TierOp) -> None:
        if job_id in reached:
            reached[job_id].set()
            assert release.wait(10)

    io.fault_hook = hold
    io.write(1, [_key(1)], [1])
    io.read(2, [_key(300)], [29])
    io.write(3, [_key(3)], [3])
    assert reached[1].wait(10) and reached[2].wait(10)
    assert io.cancel([1, 2, 3]) == {3}
    release.set()
    done = _done(io)
    assert done[1].success and done[2].success and not done[3].success
    assert torch.equal(pool[29], stored)
    assert tier.contains([_key(1), _key(3)]) == [True, False]


def test_a_queued_read_keeps_its_block_from_a_write_that_evicts(setup: Setup) -> None:
    # The scheduler offered block 0, the least recently used of a full tier, and its read is
    # queued behind another; a write-back running meanwhile needs a slot. It must evict
    # another block, not the one the queued read is for (held from submission to the end).
    tier, pool, io, gate = setup
    blocks = torch.arange(64, dtype=torch.uint8).view(64, 1).expand(64, BLOCK).contiguous()
    for i in range(64):
        assert tier.write([(_key(i), blocks[i].numpy().data)]) == [True]
    assert tier.capacity_blocks == 64 and all(tier.contains([_key(i) for i in range(64)]))
    io.read(1, [_key(63)], [10])  # held in the tier: the read after it waits in the queue
    gate.wait_first()
    io.read(2, [_key(0)], [11])
    io.write(3, [_key(500)], [3])
    seen: dict[int, TierResult] = {}
    assert _wait_for(io, 3, seen).success  # while both reads wait
    assert tier.contains([_key(0), _key(1), _key(500)]) == [True, False, True]  # block 1 made room
    gate.open()
    done = {**seen, **_done(io)}
    assert done[1].success and done[2].success
    assert torch.equal(pool[11], blocks[0]) and torch.equal(pool[10], blocks[63])
    # Released once read: 64 new blocks evict every old one, block 0 included.
    for i in range(64):
        assert tier.write([(_key(1000 + i), blocks[i].numpy().data)]) == [True]
    assert not any(tier.contains([_key(i) for i in (*range(64), 500)]))
