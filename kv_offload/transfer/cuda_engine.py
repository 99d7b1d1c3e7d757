# SPDX-License-Identifier: Apache-2.0
"""CUDA transfer engine: DMA between a CUDA KV cache and the (page-locked) host pool.

Each job becomes coalesced byte-range descriptors (:func:`build_copy_batch`), split into
driver calls (:func:`plan_calls`: ``cuMemcpyBatchAsync`` where the driver has it, else a
``cuMemcpyAsync`` loop), enqueued on a side stream of its direction. Ordering and
completion follow :mod:`kv_offload.transfer.stream_schedule`:

* a job's stream first waits for an event recorded on the compute stream at submit time;
* jobs of one direction are chained FIFO by events; stores and loads use separate streams;
* ``poll`` queries end events (never blocks), ``wait`` synchronizes them;
* before kernels read blocks a load wrote, the caller either saw the load in ``poll`` or
  calls :meth:`CudaTransferEngine.wait_on_stream`.

``TransferResult.seconds`` is the device time of the job's copies (timing events around
them), so ``nbytes / seconds`` is the transfer's bandwidth; a failed job reports host time
since submission instead.

The engine is driven from one thread (vLLM's worker calls submit/poll/wait from its step
loop); it has no background thread and takes no locks.

Nothing here imports cuda-python or initializes CUDA at import time, so this module imports
on machines without a GPU; constructing the engine there raises a clear error.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Sequence
from typing import cast

import torch

from kv_offload.transfer.base import Direction, TransferEngine, TransferJob, TransferResult
from kv_offload.transfer.cuda_batch import CopyCall, CopyMethod, CopyPolicy, plan_calls
from kv_offload.transfer.plan import CopyBatch, PageRegion, build_copy_batch, host_slots_for
from kv_offload.transfer.stream_schedule import Event, Stream, StreamBackend, StreamScheduler

__all__ = ["CudaTransferEngine", "CudaStreamBackend"]

logger = logging.getLogger(__name__)


class _CudaStream:
    """A torch CUDA stream as a protocol :class:`Stream`."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream

    @property
    def handle(self) -> int:
        return int(self.stream.cuda_stream)

    def wait_event(self, event: Event) -> None:
        self.stream.wait_event(cast(_CudaEvent, event).event)


class _CudaEvent:
    """A torch CUDA event as a protocol :class:`Event`."""

    def __init__(self, timing: bool) -> None:
        self.event = torch.cuda.Event(enable_timing=timing)  # type: ignore[no-untyped-call]

    def record(self, stream: Stream) -> None:
        self.event.record(cast(_CudaStream, stream).stream)

    def query(self) -> bool:
        return bool(self.event.query())  # type: ignore[no-untyped-call]

    def synchronize(self) -> None:
        self.event.synchronize()

    def elapsed_seconds(self, end: Event) -> float:
        return float(self.event.elapsed_time(cast(_CudaEvent, end).event)) / 1e3


class CudaStreamBackend:
    """The stream/event protocol on real CUDA streams and events of one device.

    Copies go through the driver API (:mod:`kv_offload.cuda.copy`). ``load_src_order_any``
    lets the driver read a load's host source out of stream order (safe: a slot being
    loaded is pinned by the manager and nothing writes it; see ``cuda.copy``).
    """

    def __init__(self, device: torch.device, *, load_src_order_any: bool = True) -> None:
        from kv_offload.cuda import copy as cuda_copy
        from kv_offload.cuda.runtime import ensure_context

        self.device = device
        self.index = int(device.index if device.index is not None else torch.cuda.current_device())
        self.load_src_order_any = load_src_order_any
        self._copy = cuda_copy
        self._ensure_context = ensure_context
        ensure_context(self.index)

    def new_stream(self) -> Stream:
        return _CudaStream(torch.cuda.Stream(device=self.device))  # type: ignore[no-untyped-call]

    def new_event(self, timing: bool) -> Event:
        with torch.cuda.device(self.device):
            return _CudaEvent(timing)

    def current_stream(self) -> Stream:
        return _CudaStream(torch.cuda.current_stream(self.device))

    def as_stream(self, stream: object | None) -> Stream:
        if stream is None:
            return self.current_stream()
        if isinstance(stream, _CudaStream):
            return stream
        if isinstance(stream, torch.cuda.Stream):
            return _CudaStream(stream)
        raise TypeError(f"expected a torch.cuda.Stream, got {type(stream).__name__}")

    def enqueue_copies(self, calls: Sequence[CopyCall], stream: Stream, direction: Direction) -> None:
        # Driver calls use the calling thread's current context; the submitting thread may
        # never have touched CUDA through the runtime.
        self._ensure_context(self.index)
        handle = cast(_CudaStream, stream).handle
        any_order = direction is Direction.LOAD and self.load_src_order_any
        for call in calls:
            b = call.batch
            if call.method is CopyMethod.BATCH:
                self._copy.memcpy_batch_async(b.src, b.dst, b.sizes, handle, src_order_any=any_order)
            else:
                self._copy.memcpy_loop_async(b.src, b.dst, b.sizes, handle)


class CudaTransferEngine(TransferEngine):
    """Moves blocks between a CUDA KV cache and a host pool with DMA on side streams.

    Args:
        regions: the KV cache's page regions (``regions_from_layers`` over CUDA tensors).
        pool: ``uint8[num_slots, slot_bytes]`` CPU pool tensor, page-locked for async DMA
            (``HostPool`` pins it when CUDA is present; a pageable pool works, slower).
        device: the KV cache's device (default: torch's current CUDA device).
        streams_per_direction: side streams per direction (stores and loads never share one).
        policy: how descriptors become driver calls (default: batched DMA if the driver
            passes a probe copy, else a cuMemcpyAsync loop).
        load_src_order_any: let the driver read loads' host sources out of stream order.
        backend: a different :class:`StreamBackend` (tests drive the engine on CPU with a
            deterministic one); the default is real CUDA streams and events.

    Raises ``ValueError`` when a block's pages do not fit in one pool slot. STORE jobs into
    a pool attached read-only are refused at submit.
    """

    def __init__(
        self,
        regions: Sequence[PageRegion],
        pool: torch.Tensor,
        *,
        device: torch.device | int | None = None,
        streams_per_direction: int = 2,
        policy: CopyPolicy | None = None,
        load_src_order_any: bool = True,
        backend: StreamBackend | None = None,
    ) -> None:
        self.regions = list(regions)
        slots = host_slots_for(pool, self.regions)  # pool shape, and a block fits in one slot
        self.pool = pool
        self.read_only = slots.read_only
        self._host_base = slots.base
        self._slot_bytes = slots.slot_bytes
        self._num_slots = slots.num_slots
        if backend is None:
            backend, policy = self._cuda_backend(device, policy, load_src_order_any)
        self.backend = backend
        self.policy = policy if policy is not None else CopyPolicy(batch_available=False)
        # Plain closures, not bound methods: the scheduler must not reference the engine, so
        # dropping the engine frees it (and its view of the pool) at once, without the GC.
        regions_, base, slot_bytes, num_slots, policy_, read_only = (
            self.regions, self._host_base, self._slot_bytes, self._num_slots, self.policy, self.read_only
        )  # fmt: skip
        self._sched = StreamScheduler(
            backend,
            lambda job: build_copy_batch(job, regions_, base, slot_bytes, num_slots, read_only=read_only),
            lambda batch: plan_calls(batch, policy_),
            streams_per_direction=streams_per_direction,
        )

    def _cuda_backend(
        self, device: torch.device | int | None, policy: CopyPolicy | None, load_src_order_any: bool
    ) -> tuple[StreamBackend, CopyPolicy]:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "CudaTransferEngine needs a CUDA device (torch.cuda.is_available() is False);"
                " use CpuTransferEngine on CPU-only machines"
            )
        if device is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            dev = torch.device("cuda", device)
        else:
            dev = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {dev}")
        backend = CudaStreamBackend(dev, load_src_order_any=load_src_order_any)
        if not self.pool.is_pinned():
            warnings.warn(
                "kv_offload: the host pool is not page-locked; CUDA copies to and from it are"
                " staged through driver buffers and block the host",
                RuntimeWarning,
                stacklevel=3,
            )
        if policy is None:
            from kv_offload.cuda.copy import probe_batch_memcpy

            why_not = probe_batch_memcpy(backend.index)
            if why_not is not None:
                logger.info("kv_offload: batched DMA unavailable (%s); using a cuMemcpyAsync loop", why_not)
            policy = CopyPolicy(batch_available=why_not is None)
        return backend, policy

    # -- planning (pure) ---------------------------------------------------------------------
    def plan(self, job: TransferJob) -> CopyBatch:
        """Coalesced descriptors of ``job``; raises :class:`TransferError` on bad ids."""
        return build_copy_batch(
            job, self.regions, self._host_base, self._slot_bytes, self._num_slots, read_only=self.read_only
        )

    def plan_calls(self, batch: CopyBatch) -> list[CopyCall]:
        return plan_calls(batch, self.policy)

    # -- TransferEngine ----------------------------------------------------------------------
    def submit(self, job: TransferJob) -> None:
        self._sched.submit(job)

    def poll(self) -> list[TransferResult]:
        return self._sched.poll()

    def wait(self, job_ids: Collection[int]) -> None:
        self._sched.wait(job_ids)

    def wait_on_stream(self, job_ids: Collection[int], stream: object | None = None) -> None:
        """Make ``stream`` (a ``torch.cuda.Stream``; default the current one) wait for the jobs.

        Enqueue this before kernels that read blocks the named loads write (or overwrite
        blocks the named stores read), unless ``poll`` already reported those jobs.
        Never blocks the host.
        """
        self._sched.wait_on_stream(job_ids, stream)

    def pending(self) -> int:
        return self._sched.pending()

    @property
    def events_created(self) -> int:
        return self._sched.events_created

    def shutdown(self) -> None:
        self._sched.shutdown()

    def __repr__(self) -> str:
        return (
            f"CudaTransferEngine(regions={len(self.regions)}, slots={self._num_slots},"
            f" slot_bytes={self._slot_bytes}, policy={self.policy})"
        )
