# SPDX-License-Identifier: Apache-2.0
"""CPU transfer engine: host-to-host paged gather/scatter for CPU-only vLLM and tests.

Jobs run in submission order on one background thread; each job is a batch of byte-range
descriptors (see :mod:`kv_offload.transfer.plan`) executed by the native
``_copy_segments`` op, which splits the bytes over ``num_threads`` threads and runs without
the GIL. So ``submit`` returns at once and the engine step is never blocked by a copy.

The op copies between raw addresses, so it is internal (underscore-named, not documented):
every descriptor that reaches it is built by :func:`build_copy_batch` from regions and a pool
the engine checked when it was built (:func:`host_slots_for`).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence

import torch

from kv_offload._native import load_native
from kv_offload.transfer.base import TransferEngine, TransferError, TransferJob, TransferResult
from kv_offload.transfer.plan import CopyBatch, PageRegion, build_copy_batch, host_slots_for

__all__ = ["CpuTransferEngine"]


def _run_copy_batch(batch: CopyBatch, num_threads: int) -> None:
    """Execute ``batch`` now, on the calling thread (plus ``num_threads - 1`` helpers).

    Internal: the addresses are not checked here. Callers pass only batches planned
    against buffers they own (the engine, tests and the host-copy benchmark).
    """
    if batch.num_descriptors == 0:
        return
    load_native()
    src, dst, sizes = batch.as_tensors()
    torch.ops.kv_offload._copy_segments(src, dst, sizes, num_threads)


_Item = tuple[TransferJob, CopyBatch, float, torch.Tensor]


#: A test hook run on the copy thread before each job's copy (it may sleep or raise: see
#: :mod:`kv_offload.testing.faults`); never set outside tests.
FaultHook = Callable[[TransferJob], None]


class _State:
    """What the copy thread shares with the engine. The thread holds only this (never the
    engine), so a dropped engine is freed at once and its finalizer stops the thread."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads
        self.jobs: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.done: list[TransferResult] = []
        self.finished: set[int] = set()
        self.in_flight: set[int] = set()
        #: jobs cancelled before their copy started (they never touch memory)
        self.cancelled: set[int] = set()
        #: the job whose copy is running now (not cancellable)
        self.copying: int | None = None
        self.fault_hook: FaultHook | None = None
        self.cond = threading.Condition()
        self.closed = False

    def stop(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.jobs.put(None)  # behind every job already queued: those still run

    def run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            # The queued item holds the pool tensor: a job still runs into live memory when
            # the engine was dropped after submitting it.
            job, batch, submitted, _pool = item
            self._run_one(job, batch, submitted)
            del item, _pool

    def _run_one(self, job: TransferJob, batch: CopyBatch, submitted: float) -> None:
        """One job; whatever it raises becomes its failure (the thread never dies of a job)."""
        error: str | None = None
        try:
            hook = self.fault_hook
            if hook is not None:
                hook(job)
            with self.cond:
                # Checked under the lock cancel() takes: a job cancelled here never copies.
                if job.job_id in self.cancelled:
                    error = "cancelled before its copy started (timed out)"
                else:
                    self.copying = job.job_id
            if error is None:
                _run_copy_batch(batch, self.num_threads)
        except Exception as exc:  # reported as a failed job; the caller recomputes
            error = f"{type(exc).__name__}: {exc}"
        result = TransferResult(
            job_id=job.job_id,
            success=error is None,
            nbytes=batch.total_bytes if error is None else 0,
            seconds=time.perf_counter() - submitted,
            direction=job.direction,
            error=error,
        )
        with self.cond:
            self.copying = None
            self.cancelled.discard(job.job_id)
            self.done.append(result)
            self.finished.add(job.job_id)
            self.cond.notify_all()


class CpuTransferEngine(TransferEngine):
    """Copies blocks between KV-cache pages in host memory and a host pool.

    Args:
        regions: the KV cache's page regions (``regions_from_layers``).
        pool: ``uint8[num_slots, slot_bytes]`` host pool tensor (a backend's ``open()``).
        num_threads: copy threads per job.

    Raises ``ValueError`` when the regions are not CPU memory or a block's pages do not fit
    in one pool slot. STORE jobs into a pool attached read-only are refused at submit.

    Dropping the engine without :meth:`shutdown` stops its thread once the jobs already
    submitted have run.
    """

    def __init__(self, regions: Sequence[PageRegion], pool: torch.Tensor, *, num_threads: int = 2) -> None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= 256:
            raise ValueError(f"num_threads must be an integer in [1, 256], got {num_threads!r}")
        self.regions = list(regions)
        for i, r in enumerate(self.regions):
            if not isinstance(r, PageRegion):
                raise TypeError(f"region {i}: expected a PageRegion, got {type(r).__name__}")
            if r.device != "cpu" or r.base == 0:
                raise ValueError(f"region {i}: the CPU engine copies CPU memory only, got {r.device} memory")
        slots = host_slots_for(pool, self.regions)
        load_native()
        self.pool = pool
        self.num_threads = num_threads
        self.read_only = slots.read_only
        self._host_base = slots.base
        self._slot_bytes = slots.slot_bytes
        self._num_slots = slots.num_slots
        self._state = _State(num_threads)
        self._thread = threading.Thread(target=self._state.run, name="kv_offload-cpu-copy", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._state.stop)

    def plan(self, job: TransferJob) -> CopyBatch:
        return build_copy_batch(
            job, self.regions, self._host_base, self._slot_bytes, self._num_slots, read_only=self.read_only
        )

    def submit(self, job: TransferJob) -> None:
        state = self._state
        if state.closed:
            raise TransferError("engine is shut down")
        if not isinstance(job, TransferJob):
            raise TypeError(f"expected a TransferJob, got {type(job).__name__}")
        batch = self.plan(job)  # validates ids before anything is queued
        with state.cond:
            # Checked again, and queued, under the lock that shutdown() takes: a job queued
            # behind the stop sentinel would never run and wait() on it would never return.
            if state.closed:
                raise TransferError("engine is shut down")
            if job.job_id in state.in_flight:
                raise TransferError(f"job {job.job_id} is already in flight")
            state.in_flight.add(job.job_id)
            state.jobs.put((job, batch, time.perf_counter(), self.pool))

    def poll(self) -> list[TransferResult]:
        state = self._state
        with state.cond:
            done, state.done = state.done, []
            for r in done:
                state.in_flight.discard(r.job_id)
                state.finished.discard(r.job_id)
        return done

    def wait(self, job_ids: Collection[int]) -> None:
        state = self._state
        with state.cond:
            state.cond.wait_for(lambda: all(j in state.finished or j not in state.in_flight for j in job_ids))

    def wait_for(self, job_ids: Collection[int], timeout: float) -> bool:
        state = self._state
        with state.cond:
            return state.cond.wait_for(
                lambda: all(j in state.finished or j not in state.in_flight for j in job_ids), max(0.0, timeout)
            )

    def cancel(self, job_ids: Collection[int]) -> set[int]:
        state = self._state
        out: set[int] = set()
        with state.cond:
            for j in job_ids:
                if j in state.in_flight and j not in state.finished and j != state.copying:
                    state.cancelled.add(j)
                    out.add(j)
        return out

    @property
    def fault_hook(self) -> FaultHook | None:
        """Test only: run on the copy thread before each job (see :data:`FaultHook`)."""
        return self._state.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:
        self._state.fault_hook = hook

    def pending(self) -> int:
        with self._state.cond:
            return len(self._state.in_flight)

    def shutdown(self) -> None:
        self._state.stop()
        self._thread.join()
