# SPDX-License-Identifier: Apache-2.0
"""TierIO: the order tier jobs run in (reads ahead of queued writes, writes never starved),
over a real disk tier, with the data checked both ways."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_offload.tiers.disk import DiskTier
from kv_offload.transfer.tier_io import READ_BURST, TierIO, TierOp, TierResult

BLOCK = 8192
SLOTS = 32


class _Gate:
    """A fault hook that holds the first job on the tier thread until :meth:`open`, and
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


def test_a_read_runs_ahead_of_the_writes_queued_before_it(setup: Setup) -> None:
    tier, pool, io, gate = setup
    stored = torch.full((BLOCK,), 7, dtype=torch.uint8)
    assert tier.write([(_key(100), stored.numpy().data)]) == [True]
    before = pool.clone()
    io.write(1, [_key(1)], [1])  # held on the tier thread
    gate.wait_first()
    io.write(2, [_key(2)], [2])
    io.write(3, [_key(3), _key(4)], [3, 4])
    io.read(4, [_key(100)], [20])
    gate.open()
    done = _done(io)
    assert gate.started == [1, 4, 2, 3]
    assert all(r.success for r in done.values()) and done[4].op is TierOp.READ
    # The read put the tier's block in its slot and nothing else; the writes stored theirs.
    assert torch.equal(pool[20], stored)
    untouched = [s for s in range(SLOTS) if s != 20]
    assert torch.equal(pool[untouched], before[untouched])
    back = torch.zeros(4, BLOCK, dtype=torch.uint8)
    views = [back[i].numpy().data for i in range(4)]
    assert tier.read([_key(1), _key(2), _key(3), _key(4)], views) == [True] * 4
    assert torch.equal(back, pool[1:5])


def test_a_waiting_write_runs_after_at_most_read_burst_reads(setup: Setup) -> None:
    tier, pool, io, gate = setup
    stored = torch.full((BLOCK,), 3, dtype=torch.uint8)
    assert tier.write([(_key(200), stored.numpy().data)]) == [True]
    io.write(1, [_key(1)], [1])
    gate.wait_first()
    io.write(2, [_key(2)], [2])
    reads = list(range(10, 10 + READ_BURST + 2))
    for job, slot in zip(reads, range(8, 8 + len(reads))):
        io.read(job, [_key(200)], [slot])
    io.write(3, [_key(3)], [3])
    gate.open()
    done = _done(io)
    assert gate.started == [1, *reads[:READ_BURST], 2, *reads[READ_BURST:], 3]
    assert all(r.success for r in done.values())
    assert torch.equal(pool[8 : 8 + len(reads)], stored.expand(len(reads), BLOCK))


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
