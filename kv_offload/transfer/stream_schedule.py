# SPDX-License-Identifier: Apache-2.0
"""Job scheduling over streams and events: ordering, FIFO chaining, completion bookkeeping.

This is the part of the CUDA engine that does not depend on CUDA. It speaks a small
stream/event protocol (:class:`StreamBackend`, :class:`Stream`, :class:`Event`, modelled on
CUDA's semantics); :mod:`kv_offload.transfer.cuda_engine` implements it with real CUDA
streams and events, and the tests drive the same scheduler with a deterministic CPU
implementation to check the ordering rules.

Protocol semantics (CUDA's):

* work enqueued on one stream runs in order; different streams run concurrently;
* ``event.record(stream)`` captures "all work enqueued on ``stream`` so far";
  ``event.query()`` is true once that work finished (an event never recorded counts as
  finished); re-recording an event does not affect waits enqueued before;
* ``stream.wait_event(event)`` makes work enqueued on ``stream`` afterwards wait until the
  work captured by ``event`` *at the time of the call* finished (no host blocking).

Ordering rules, per job (see ``submit``):

1. **Compute before transfer.** An event recorded on the caller's current (compute) stream
   at submit time, waited on by the transfer stream. A store reads live KV written by
   kernels enqueued before the submit; a load overwrites device blocks that kernels
   enqueued before the submit may still read (or that were just zeroed).
2. **FIFO per direction.** Each job's stream waits on the previous job of the same
   direction, so jobs of one direction complete in submission order (``poll`` reports them
   in that order and only needs to query each direction's oldest job). Stores and loads
   are independent lanes on separate streams and may overlap (the copy engines of both
   directions run at once).
3. **Transfer before compute (loads).** The engine cannot know when the caller will read a
   loaded block. The caller either waits for ``poll`` to report the load (the connector's
   rule: a request runs only after its load was reported finished), or calls
   :meth:`StreamScheduler.wait_on_stream` to make a stream wait for the job on the device.
   The same applies to a store's source blocks before the caller overwrites them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from kv_offload.transfer.base import Direction, TransferError, TransferJob, TransferResult
from kv_offload.transfer.cuda_batch import CopyCall
from kv_offload.transfer.plan import CopyBatch

__all__ = ["Event", "Stream", "StreamBackend", "StreamScheduler"]


class Stream(Protocol):
    def wait_event(self, event: Event) -> None:
        """Work enqueued on this stream from now on waits for ``event``'s captured work."""


class Event(Protocol):
    def record(self, stream: Stream) -> None:
        """Capture the work enqueued on ``stream`` so far."""

    def query(self) -> bool:
        """The captured work finished. Never blocks. Raises if the device reported an error."""

    def synchronize(self) -> None:
        """Block the host until the captured work finished. Raises on a device error."""

    def elapsed_seconds(self, end: Event) -> float:
        """Device time between this (start) event and ``end``; both must have completed."""


class StreamBackend(Protocol):
    def new_stream(self) -> Stream:
        """A fresh stream for transfers (not the compute stream)."""

    def new_event(self, timing: bool) -> Event:
        """A fresh event; ``timing`` events can be used with ``elapsed_seconds``."""

    def current_stream(self) -> Stream:
        """The caller's current (compute) stream, at the time of the call."""

    def as_stream(self, stream: object | None) -> Stream:
        """A caller-supplied stream object (``None``: the current stream) as a protocol stream."""

    def enqueue_copies(self, calls: Sequence[CopyCall], stream: Stream, direction: Direction) -> None:
        """Enqueue ``calls`` in order on ``stream``. Raises if the driver rejects a call."""


class _EventPool:
    """Recycles events of finished jobs (creating CUDA events costs a driver call)."""

    def __init__(self, backend: StreamBackend, timing: bool) -> None:
        self._backend = backend
        self._timing = timing
        self._free: list[Event] = []
        self.created = 0

    def get(self) -> Event:
        if self._free:
            return self._free.pop()
        self.created += 1
        return self._backend.new_event(self._timing)

    def put(self, event: Event | None) -> None:
        if event is not None:
            self._free.append(event)


@dataclass
class _Entry:
    job: TransferJob
    nbytes: int
    submitted: float
    ready: Event | None = None
    start: Event | None = None
    end: Event | None = None
    error: str | None = None


class _Lane:
    """Jobs of one direction: a round-robin pool of streams and the FIFO of in-flight jobs."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.next = 0
        self.queue: collections.deque[_Entry] = collections.deque()
        #: end event of the newest job still able to be pending (None once it finished)
        self.last_end: Event | None = None

    def stream(self) -> Stream:
        s = self.streams[self.next]
        self.next = (self.next + 1) % len(self.streams)
        return s


class StreamScheduler:
    """Runs :class:`TransferJob` s as copies on side streams, following the rules above.

    Args:
        backend: the stream/event implementation.
        plan: job -> coalesced descriptors (raises :class:`TransferError` on bad ids).
        plan_calls: descriptors -> driver calls.
        streams_per_direction: size of each direction's stream pool.
        clock: host clock for failed jobs' ``seconds`` (tests pass a fake one).
    """

    def __init__(
        self,
        backend: StreamBackend,
        plan: Callable[[TransferJob], CopyBatch],
        plan_calls: Callable[[CopyBatch], list[CopyCall]],
        *,
        streams_per_direction: int = 2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if streams_per_direction < 1:
            raise ValueError(f"streams_per_direction must be >= 1, got {streams_per_direction}")
        self._backend = backend
        self._plan = plan
        self._plan_calls = plan_calls
        self._clock = clock
        self._lanes = {
            d: _Lane([backend.new_stream() for _ in range(streams_per_direction)]) for d in Direction
        }
        self._timing_events = _EventPool(backend, timing=True)
        self._sync_events = _EventPool(backend, timing=False)
        self._entries: dict[int, _Entry] = {}
        self._closed = False

    # -- submission -------------------------------------------------------------------------
    def submit(self, job: TransferJob) -> None:
        """Enqueue ``job``'s copies behind the compute stream and the previous job of its direction.

        Bad jobs raise :class:`TransferError` before anything is enqueued. A driver error
        while enqueueing does not raise: the job is reported failed by :meth:`poll`, once
        whatever part of it was enqueued has finished.
        """
        if self._closed:
            raise TransferError("engine is shut down")
        if job.job_id in self._entries:
            raise TransferError(f"job {job.job_id} is already in flight")
        batch = self._plan(job)  # validates ids: raises before anything is queued
        calls = self._plan_calls(batch)
        lane = self._lanes[job.direction]
        entry = _Entry(job=job, nbytes=batch.total_bytes, submitted=self._clock())
        try:
            stream = lane.stream()
            # Rule 1 (compute -> transfer): a store must not read a KV block before the
            # kernels that wrote it finished, and a load must not overwrite a block that
            # kernels enqueued earlier still read. Capture the compute stream now and make
            # the transfer stream wait for it on the device (the host does not block).
            entry.ready = self._sync_events.get()
            entry.ready.record(self._backend.current_stream())
            stream.wait_event(entry.ready)
            # Rule 2 (FIFO per direction): the previous job of this direction may sit on
            # another stream of the pool; waiting on its end event keeps completion in
            # submission order, so poll() can stop at the first unfinished job.
            if lane.last_end is not None:
                stream.wait_event(lane.last_end)
            # Timing events bracket only the copies: they complete after both waits, so
            # start->end is the device time of this job's transfer.
            entry.start = self._timing_events.get()
            entry.start.record(stream)
            try:
                self._backend.enqueue_copies(calls, stream, job.direction)
            except Exception as exc:  # reported by poll(); the caller recomputes
                entry.error = f"{type(exc).__name__}: {exc}"
            # Recorded even after an enqueue error: part of the job may be in flight, and
            # the failure must not be reported (letting the caller reuse the blocks) before
            # that part finished.
            end = self._timing_events.get()
            end.record(stream)
            entry.end = end
            lane.last_end = end
        except Exception as exc:  # stream/event calls failed: the device is unusable
            entry.error = entry.error or f"{type(exc).__name__}: {exc}"
            # Not known which barriers were enqueued: drop the events rather than reuse them.
            entry.ready = entry.start = entry.end = None
        self._entries[job.job_id] = entry
        lane.queue.append(entry)

    # -- completion -------------------------------------------------------------------------
    def _finished(self, entry: _Entry) -> bool:
        if entry.end is None:
            return True
        try:
            return entry.end.query()
        except Exception as exc:  # an asynchronous device error surfaced here
            entry.error = entry.error or f"{type(exc).__name__}: {exc}"
            return True

    def _result(self, entry: _Entry) -> TransferResult:
        seconds: float | None = None
        if entry.error is None and entry.start is not None and entry.end is not None:
            try:
                seconds = entry.start.elapsed_seconds(entry.end)
            except Exception as exc:
                entry.error = f"{type(exc).__name__}: {exc}"
        if seconds is None:
            seconds = self._clock() - entry.submitted
        ok = entry.error is None
        return TransferResult(
            job_id=entry.job.job_id,
            success=ok,
            nbytes=entry.nbytes if ok else 0,
            seconds=seconds,
            direction=entry.job.direction,
            error=entry.error,
        )

    def _release(self, lane: _Lane, entry: _Entry) -> None:
        del self._entries[entry.job.job_id]
        if lane.last_end is entry.end:
            # Finished: later jobs need not wait on it, and it may be recycled below.
            lane.last_end = None
        if entry.error is None:
            self._sync_events.put(entry.ready)
            self._timing_events.put(entry.start)
            self._timing_events.put(entry.end)

    def poll(self) -> list[TransferResult]:
        """Results of finished jobs, oldest first per direction. Never blocks.

        Only each direction's oldest job is queried: by rule 2 no younger job of that
        direction can have finished before it.
        """
        out: list[TransferResult] = []
        for lane in self._lanes.values():
            while lane.queue and self._finished(lane.queue[0]):
                entry = lane.queue.popleft()
                out.append(self._result(entry))
                self._release(lane, entry)
        return out

    def wait(self, job_ids: Collection[int]) -> None:
        """Block until the named jobs finished on the device (unknown ids are ignored)."""
        for job_id in job_ids:
            entry = self._entries.get(job_id)
            if entry is None or entry.end is None:
                continue
            try:
                entry.end.synchronize()
            except Exception as exc:
                entry.error = entry.error or f"{type(exc).__name__}: {exc}"

    def wait_on_stream(self, job_ids: Collection[int], stream: object | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait on the device for the named jobs.

        Rule 3: call this before enqueueing kernels that read blocks a load writes (or
        overwrite blocks a store reads). Jobs already reported by :meth:`poll`, and unknown
        ids, need no wait. Never blocks the host.
        """
        target = self._backend.as_stream(stream)
        for job_id in job_ids:
            entry = self._entries.get(job_id)
            if entry is not None and entry.end is not None:
                target.wait_event(entry.end)

    def pending(self) -> int:
        return len(self._entries)

    def in_flight(self, job_id: int) -> bool:
        return job_id in self._entries

    @property
    def events_created(self) -> int:
        """Events created so far (bounded by the peak number of jobs in flight)."""
        return self._timing_events.created + self._sync_events.created

    def shutdown(self) -> None:
        """Refuse new jobs and wait for every submitted one; results stay available to poll."""
        if self._closed:
            return
        self._closed = True
        self.wait(list(self._entries))
