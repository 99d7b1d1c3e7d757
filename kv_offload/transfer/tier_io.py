# SPDX-License-Identifier: Apache-2.0
"""Tier I/O: block copies between host-pool slots and a tier below the pool, off the step.

The transfer path (pool <-> tier) next to the engines' (KV cache <-> pool): a job reads
blocks from a :class:`~kv_offload.tiers.BlockTier` into pool slots (a promotion's first
leg) or writes pool slots to the tier (a write-back). Reads and writes run on two background
threads, each kind in submission order (the tier batches and parallelises each job's I/O
itself, and takes calls from several threads at once: :mod:`kv_offload.tiers.base`), so
``read`` and ``write`` return at once and ``poll`` hands back what finished, never blocking.

Reads never queue behind writes: a promotion holds up a request's first token, a write-back
holds up nobody (its blocks stay in the pool meanwhile), and one step's write-back can be
hundreds of MiB. This is safe because the scheduler never has a read and a write of one block
in flight: a block being written back is pinned in the pool, so a request gets it from there,
not from the tier.

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

__all__ = ["TierIO", "TierOp", "TierResult"]

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


#: job id, kind, keys, slots, keys to remove first (a write's), when submitted
_Item = tuple[int, TierOp, tuple[bytes, ...], tuple[int, ...], tuple[bytes, ...], float]
#: A test hook run on the tier thread before each job (it may sleep or raise: see
#: :mod:`kv_offload.testing.faults`); never set outside tests.
TierFaultHook = Callable[[int, TierOp], None]


class TierIO:
    """Runs tier jobs over ``pool`` (``uint8[num_slots, slot_bytes]``, the tier's block size)."""

    def __init__(self, tier: BlockTier, pool: torch.Tensor) -> None:
        if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.device.type != "cpu":
            raise ValueError("pool must be a CPU uint8 tensor [num_slots, slot_bytes]")
        if pool.shape[1] != tier.block_bytes:
            raise ValueError(f"pool slots hold {pool.shape[1]} bytes but the tier's blocks are {tier.block_bytes}")
        self.tier = tier
        self._slots = pool.numpy()  # a view: one memoryview per slot, no copy
        tier.register_memory(memoryview(self._slots.reshape(-1).data))
        # Only a tier that can learn of other processes' blocks is worth a second look.
        self._refreshes = type(tier).refresh is not BlockTier.refresh
        #: jobs not started, by kind: each kind's thread takes them in submission order
        self._queues: dict[TierOp, deque[_Item]] = {TierOp.READ: deque(), TierOp.WRITE: deque()}
        self._stopping = False
        self._done: list[TierResult] = []
        self._pending = 0
        #: jobs cancelled before they started (they never touch the pool), and those running now
        #: (a read and a write at most)
        self._cancelled: set[int] = set()
        self._queued: set[int] = set()
        self._running: set[int] = set()
        #: test only, see :data:`TierFaultHook`
        self.fault_hook: TierFaultHook | None = None
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, args=(op,), name=f"kv_offload-tier-{op.value}", daemon=True)
            for op in TierOp
        ]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def read(self, job_id: int, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        self._put(job_id, TierOp.READ, keys, slots)

    def write(self, job_id: int, keys: Sequence[bytes], slots: Sequence[int], evict: Sequence[bytes] = ()) -> None:
        """Write the slots' blocks under ``keys``, after evicting the blocks ``evict`` from the
        tier (:meth:`BlockTier.evict`: room the caller makes for them; the tier then evicts
        nothing of its own choosing unless it is fuller than the caller knows)."""
        self._put(job_id, TierOp.WRITE, keys, slots, evict)

    def _put(self, job_id: int, op: TierOp, keys: Sequence[bytes], slots: Sequence[int],
             evict: Sequence[bytes] = ()) -> None:  # fmt: skip
        if len(keys) != len(slots):
            raise ValueError(f"tier job {job_id}: {len(keys)} keys but {len(slots)} slots")
        n = self._slots.shape[0]
        bad = [s for s in slots if not 0 <= int(s) < n]
        if bad:
            raise ValueError(f"tier job {job_id}: slot {bad[0]} out of range [0, {n})")
        item = (job_id, op, tuple(keys), tuple(int(s) for s in slots), tuple(evict), time.perf_counter())
        if op is TierOp.READ:
            # Held from now until the read ends: a write-back running meanwhile on the other
            # thread must not evict them to make room (it did, in the halves soak: a block the
            # scheduler offered was evicted 0.2 to 13 ms before its queued read ran).
            self.tier.hold(item[2])
        with self._cond:
            self._pending += 1
            self._queued.add(job_id)
            self._queues[op].append(item)
            self._cond.notify_all()

    def cancel(self, job_ids: Collection[int]) -> set[int]:
        """Cancel jobs that have not started: the ids returned never touch the pool nor the
        tier (each still comes back from :meth:`poll`, failed). A running job (a read or
        write blocked in the tier) cannot be cancelled: its slots stay in use until it ends."""
        with self._cond:
            out = {j for j in job_ids if j in self._queued and j not in self._running}
            self._cancelled |= out
        return out

    def _next(self, op: TierOp) -> _Item | None:
        """The next job of kind ``op`` (waits for one); ``None`` once stopping and none is left."""
        queue = self._queues[op]
        with self._cond:
            self._cond.wait_for(lambda: queue or self._stopping)
            return queue.popleft() if queue else None

    def _run(self, op: TierOp) -> None:
        while (item := self._next(op)) is not None:
            self._execute(item)

    def _execute(self, item: _Item) -> None:
        job_id, op, keys, slots, evict, submitted = item
        try:
            success, error = self._run_one(job_id, op, keys, slots, evict)
        finally:
            if op is TierOp.READ:
                self.tier.release(keys)
        nbytes = len(keys) * self.tier.block_bytes if success else 0
        result = TierResult(job_id, op, success, nbytes, time.perf_counter() - submitted, error)
        with self._cond:
            self._running.discard(job_id)
            self._queued.discard(job_id)
            self._cancelled.discard(job_id)
            self._done.append(result)
            self._pending -= 1
            self._cond.notify_all()

    def _run_one(self, job_id: int, op: TierOp, keys: tuple[bytes, ...], slots: tuple[int, ...],
                 evict: tuple[bytes, ...]) -> tuple[bool, str | None]:  # fmt: skip
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
                if evict:  # after the writes queued before it (they may have written them)
                    self.tier.evict(evict)
                ok = self.tier.write(list(zip(keys, views)))
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
        """Finish the jobs already submitted, then stop both threads (the tier stays open)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
