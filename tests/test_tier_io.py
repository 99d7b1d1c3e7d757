# SPDX-License-Identifier: Apache-2.0
"""TierIO: the order tier jobs run in (reads ahead of queued writes, writes never starved),
over a real disk tier, with the data checked both ways."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kv_offload.tiers.disk import DiskTier
from kv_offload.transfer.tier_io import READ_BURST, TierIO, TierOp, TierResult

BLOCK = 8192
SLOTS = 32


class _Gate:
    """A fault hook that holds the ``nth`` job to start on the tier thread until :meth:`open`,
    and records the order jobs start in."""

    def __init__(self, nth: int = 1) -> None:
        self.started: list[int] = []
        self.nth = nth
        self._open = threading.Event()
        self._first = threading.Event()

    def __call__(self, job_id: int, op: TierOp) -> None:
        self.started.append(job_id)
        if len(self.started) == self.nth:
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


class _LoggedDiskTier(DiskTier):
    """A disk tier that records its calls: ("w", blocks) or ("r", blocks)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[str, int]] = []

    def write(self, items: Sequence[tuple[bytes, memoryview]]) -> list[bool]:
        self.calls.append(("w", len(items)))
        return super().write(items)

    def read(self, keys: Sequence[bytes], into: Sequence[memoryview]) -> list[bool]:
        self.calls.append(("r", len(keys)))
        return super().read(keys, into)


def test_a_read_runs_between_two_pieces_of_a_long_write(tmp_path: Path) -> None:
    tier = _LoggedDiskTier(str(tmp_path), 64 * BLOCK, b"n" * 16, BLOCK, threads=1)
    pool = torch.arange(SLOTS * BLOCK, dtype=torch.int64).remainder(249).to(torch.uint8).view(SLOTS, BLOCK)
    stored = torch.full((BLOCK,), 9, dtype=torch.uint8)
    assert tier.write([(_key(300), stored.numpy().data)]) == [True]
    tier.calls.clear()
    io = TierIO(tier, pool, write_chunk_bytes=2 * BLOCK)
    gate = _Gate()
    io.fault_hook = gate
    try:
        io.write(1, [_key(i) for i in range(5)], list(range(5)))  # 3 pieces: 2, 2, 1 blocks
        gate.wait_first()
        io.read(2, [_key(300)], [30])
        gate.open()
        done = _done(io)
        assert tier.calls == [("w", 2), ("r", 1), ("w", 2), ("w", 1)]
        assert done[1].success and done[2].success and done[1].nbytes == 5 * BLOCK
        assert torch.equal(pool[30], stored)
        back = torch.zeros(5, BLOCK, dtype=torch.uint8)
        assert tier.read([_key(i) for i in range(5)], [back[i].numpy().data for i in range(5)]) == [True] * 5
        assert torch.equal(back, pool[:5])  # the whole write landed, piece by piece
        # While a read runs between two pieces of a write, neither can be cancelled (the
        # write's slots are still being read); a write queued behind them can.
        reached = {3: threading.Event(), 6: threading.Event()}
        release = {3: threading.Event(), 6: threading.Event()}

        def hold(job_id: int, op: TierOp) -> None:
            if job_id in reached:
                reached[job_id].set()
                assert release[job_id].wait(10)

        io.fault_hook = hold
        tier.calls.clear()
        io.write(3, [_key(i) for i in range(5, 10)], list(range(5, 10)))
        assert reached[3].wait(10)  # write 3 held as it starts
        io.read(6, [_key(300)], [29])
        io.write(5, [_key(10)], [10])
        release[3].set()
        assert reached[6].wait(10)  # read 6 held, between write 3's first and second piece
        assert tier.calls == [("w", 2)]
        assert io.cancel([3, 6, 5]) == {5}
        release[6].set()
        done = _done(io)
        assert done[3].success and done[6].success and not done[5].success
        assert tier.calls == [("w", 2), ("r", 1), ("w", 2), ("w", 1)]  # write 5 never reached the tier
        assert torch.equal(pool[29], stored)
    finally:
        io.shutdown()
        tier.close()
    with pytest.raises(ValueError, match="write_chunk_bytes"):
        TierIO(tier, pool, write_chunk_bytes=0)
