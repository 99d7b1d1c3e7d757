# SPDX-License-Identifier: Apache-2.0
"""Tier I/O: block copies between host-pool slots and a tier below the pool, off the step.

The transfer path (pool <-> tier) next to the engines' (KV cache <-> pool): a job reads
blocks from a :class:`~kv_offload.tiers.BlockTier` into pool slots (a promotion's first
leg) or writes pool slots to the tier (a write-back). Jobs run on one background thread (the
tier batches and parallelises each job's I/O itself), so ``read`` and ``write`` return at
once and ``poll`` hands back what finished, never blocking.

Reads go ahead of queued writes: a promotion holds up a request's first token, a write-back
holds up nobody (its blocks stay in the pool meanwhile). Each kind runs in submission order,
and a waiting write runs after at most :data:`READ_BURST` reads in a row, so write-backs, and
the pool slots they pin, are never starved. A write runs in pieces of ``write_chunk_bytes``
(default :data:`WRITE_CHUNK_BYTES`), and reads that arrived meanwhile run between two pieces:
a read waits for one piece, not for a whole write-back (one step's can be hundreds of MiB). The reordering is safe because the scheduler never
has a read and a write of one block in flight: a block being written back is pinned in the
pool, so a request gets it from there, not from the tier.

The caller guarantees the slots are not reused while a job runs (the scheduler reserves a
promotion's slots and pins a write-back's).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from kv_offload.tiers.base import BlockTier

__all__ = ["READ_BURST", "WRITE_CHUNK_BYTES", "TierIO", "TierOp", "TierResult"]

logger = logging.getLogger(__name__)


class TierOp(str, enum.Enum):
    #: tier -> pool slots
    READ = "read"
    #: pool slots -> tier
    WRITE = "write"


@dataclass(frozen=True)
class TierResult:
    job_id: int
    op: TierOp
    #: every block of the job was read (checksum verified) or written
    success: bool
    nbytes: int
    seconds: float
    error: str | None = None


_Item = tuple[int, TierOp, tuple[bytes, ...], tuple[int, ...], float]
#: reads run ahead of a waiting write at most this many times in a row
READ_BURST = 8
#: a write-back is written in pieces of about this many bytes, reads waiting run in between
WRITE_CHUNK_BYTES = 8 << 20
#: A test hook run on the tier thread before each job (it may sleep or raise: see
#: :mod:`kv_offload.testing.faults`); never set outside tests.
TierFaultHook = Callable[[int, TierOp], None]


class TierIO:
    """Runs tier jobs over ``pool`` (``uint8[num_slots, slot_bytes]``, the tier's block size)."""

    def __init__(self, tier: BlockTier, pool: torch.Tensor, write_chunk_bytes: int = WRITE_CHUNK_BYTES) -> None:
        if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.device.type != "cpu":
            raise ValueError("pool must be a CPU uint8 tensor [num_slots, slot_bytes]")
        if pool.shape[1] != tier.block_bytes:
            raise ValueError(f"pool slots hold {pool.shape[1]} bytes but the tier's blocks are {tier.block_bytes}")
        if write_chunk_bytes <= 0:
            raise ValueError(f"write_chunk_bytes must be positive, got {write_chunk_bytes}")
        self.tier = tier
        self._write_chunk = max(1, write_chunk_bytes // tier.block_bytes)  # blocks
        self._slots = pool.numpy()  # a view: one memoryview per slot, no copy
        tier.register_memory(memoryview(self._slots.reshape(-1).data))
        # Only a tier that can learn of other processes' blocks is worth a second look.
        self._refreshes = type(tier).refresh is not BlockTier.refresh
        #: jobs not started, by kind (see the module doc for the order they run in)
        self._reads: deque[_Item] = deque()
        self._writes: deque[_Item] = deque()
        self._reads_in_a_row = 0
        self._stopping = False
        self._done: list[TierResult] = []
        self._pending = 0
        #: jobs cancelled before they started (they never touch the pool), and those running now
        #: (a write and the reads run between two of its pieces)
        self._cancelled: set[int] = set()
        self._queued: set[int] = set()
        self._running: set[int] = set()
        #: test only, see :data:`TierFaultHook`
        self.fault_hook: TierFaultHook | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv_offload-tier-io", daemon=True)
        self._thread.start()

    def read(self, job_id: int, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        self._put(job_id, TierOp.READ, keys, slots)

    def write(self, job_id: int, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        self._put(job_id, TierOp.WRITE, keys, slots)

    def _put(self, job_id: int, op: TierOp, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        if len(keys) != len(slots):
            raise ValueError(f"tier job {job_id}: {len(keys)} keys but {len(slots)} slots")
        n = self._slots.shape[0]
        bad = [s for s in slots if not 0 <= int(s) < n]
        if bad:
            raise ValueError(f"tier job {job_id}: slot {bad[0]} out of range [0, {n})")
        item = (job_id, op, tuple(keys), tuple(int(s) for s in slots), time.perf_counter())
        with self._cond:
            self._pending += 1
            self._queued.add(job_id)
            (self._reads if op is TierOp.READ else self._writes).append(item)
            self._cond.notify_all()

    def cancel(self, job_ids: Collection[int]) -> set[int]:
        """Cancel jobs that have not started: the ids returned never touch the pool nor the
        tier (each still comes back from :meth:`poll`, failed). A running job (a read or
        write blocked in the tier) cannot be cancelled: its slots stay in use until it ends."""
        with self._cond:
            out = {j for j in job_ids if j in self._queued and j not in self._running}
            self._cancelled |= out
        return out

    def _next(self) -> _Item | None:
        """The next job to run (waits for one); ``None`` once stopping and none is left."""
        with self._cond:
            self._cond.wait_for(lambda: self._reads or self._writes or self._stopping)
            if self._reads and not (self._writes and self._reads_in_a_row >= READ_BURST):
                self._reads_in_a_row = self._reads_in_a_row + 1 if self._writes else 0  # ahead of a write
                return self._reads.popleft()
            self._reads_in_a_row = 0
            return self._writes.popleft() if self._writes else None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            self._execute(item)

    def _execute(self, item: _Item) -> None:
        job_id, op, keys, slots, submitted = item
        success, error = self._run_one(job_id, op, keys, slots)
        nbytes = len(keys) * self.tier.block_bytes if success else 0
        result = TierResult(job_id, op, success, nbytes, time.perf_counter() - submitted, error)
        with self._cond:
            self._running.discard(job_id)
            self._queued.discard(job_id)
            self._cancelled.discard(job_id)
            self._done.append(result)
            self._pending -= 1
            self._cond.notify_all()

    def _reads_meanwhile(self) -> None:
        """Between two pieces of a write: the reads that arrived since it started."""
        while True:
            with self._cond:
                if not self._reads:
                    return
                item = self._reads.popleft()
            self._execute(item)

    def _run_one(self, job_id: int, op: TierOp, keys: tuple[bytes, ...], slots: tuple[int, ...]) -> tuple[bool, str | None]:
        """One job; whatever it raises becomes its failure (the thread never dies of a job)."""
        try:
            with self._cond:
                if job_id in self._cancelled:
                    return False, "cancelled before it started (timed out)"
                self._running.add(job_id)
            hook = self.fault_hook
            if hook is not None:  # runs as part of the job: a stall here is a blocked tier call
                hook(job_id, op)
            views = [memoryview(self._slots[s]) for s in slots]
            if op is TierOp.READ:
                ok = self.tier.read(keys, views)
                if not all(ok) and self._refreshes:
                    # Blocks another process stored since this tier last looked: the
                    # scheduler's index saw them first. Look again, once, for those.
                    self.tier.refresh()
                    again = [i for i, good in enumerate(ok) if not good]
                    for i, good in zip(again, self.tier.read([keys[i] for i in again], [views[i] for i in again])):
                        ok[i] = good
            else:
                pairs = list(zip(keys, views))
                ok = []
                for at in range(0, len(pairs), self._write_chunk):
                    if at:
                        self._reads_meanwhile()
                    ok += self.tier.write(pairs[at : at + self._write_chunk])
            if all(ok):
                return True, None
            return False, f"{ok.count(False)} of {len(ok)} blocks not {'read' if op is TierOp.READ else 'written'}"
        except Exception as exc:  # reported as a failed job; the caller recomputes or skips
            # Logged once, here, with the exception's type (the worker logs results at debug).
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("kv_offload: tier %s job %d failed: %s", op.value, job_id, error)
            return False, error

    def poll(self) -> list[TierResult]:
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait_all(self) -> None:
        """Block until every submitted job finished (its result still comes from ``poll``)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    def shutdown(self) -> None:
        """Finish the jobs already submitted, then stop the thread (the tier stays open)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
