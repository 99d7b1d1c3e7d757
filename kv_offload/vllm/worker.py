# SPDX-License-Identifier: Apache-2.0
"""The connector's worker half: the pool and the transfer engine of one worker.

Runs in each vLLM worker process. It opens the storage backend's region, builds a
transfer engine over the worker's KV cache (CPU engine for a KV cache in host memory, the
CUDA engine for one on a GPU, picked in :func:`make_engine`), runs the jobs of each
:class:`~kv_offload.vllm.metadata.StepPlan` and reports what finished. No vLLM import:
the facade feeds it plain lists of tensors and plans.

Per step, in vLLM's call order::

    flush(plan)          before the forward pass: wait for the stores named in plan.flush
    start_loads(plan)    after the forward pass is launched: submit the loads
    submit_stores(plan)  after the forward pass (wait_for_save): submit the stores
    poll()               finished loads -> requests done receiving, failed-load blocks
    take_report()        everything that finished, for the scheduler half

Deadlines (``job_timeout_s``). A job its engine or tier has not finished in time is failed
the normal way (a load's blocks zeroed and reported invalid, so vLLM recomputes them; a
store's slots freed) once nothing of it can still write the KV cache: queued copies are
cancelled (the engine checks the flag before copying, per chunk for promotions) and a copy
already running is waited for (a memory copy, bounded). Its late completion is dropped. A
tier read that is blocked in the tier may still write its pool slots: the promotion's
request is released, but the job is reported to the scheduler (whose reservation keeps the
slots out of use) only when that read really ends.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kv_offload.backends import BACKENDS, StorageBackend
from kv_offload.config import OffloadConfig
from kv_offload.geometry import KVGeometry
from kv_offload.transfer import Direction, TransferEngine, TransferJob, regions_from_layers
from kv_offload.transfer.tier_io import TierIO, TierOp
from kv_offload.tiers.base import BlockTier
from kv_offload.vllm.metadata import JobOutcome, JobSpec, StepPlan, TransferReport
from kv_offload.vllm.worker_setup import (
    backend_spec,
    make_engine,
    namespace_label,
    open_disk_tier,
    open_import_tiers,
    open_remote_tier,
)

if TYPE_CHECKING:
    from kv_offload.testing.faults import ThreadFaults

__all__ = ["WorkerHalf", "backend_spec", "make_engine", "namespace_label", "open_disk_tier", "open_remote_tier"]

# A child of vLLM's logger, so messages show in vLLM's log with its format.
logger = logging.getLogger(f"vllm.{__name__}")

#: A promotion reads its blocks in chunks of about this many bytes; each chunk's copy into
#: the KV cache starts as soon as its read is verified, while the next chunk is fetched.
PROMOTE_CHUNK_BYTES = 4 << 20


@dataclass
class _Promotion:
    """A promotion in flight: its chunks' tier reads and KV cache copies still running."""

    job: JobSpec
    started: float
    #: chunk job id -> its slice of the promotion's blocks
    chunks: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: chunks whose tier read is queued or running; chunks whose copy into the KV cache is queued
    reading: set[int] = field(default_factory=set)
    copying: set[int] = field(default_factory=set)
    success: bool = True
    nbytes: int = 0
    #: failed at its deadline: no chunk is copied into the KV cache any more
    timed_out: bool = False
    #: its request was handed back to vLLM (done receiving)
    released: bool = False


class WorkerHalf:
    """Moves blocks for one worker.

    Args:
        config: the validated connector configuration.
        geometry: the KV geometry as the scheduler half sized the pool with.
        world_size, rank: this worker's place (the pool capacity is split over workers).
        namespace: this worker's 16-byte key namespace (``Namespace.rank_digest(rank)``),
            needed with a lower tier (disk, remote): tiers keep each namespace's blocks apart.
        imports: per ``imports`` entry of the config, the producer's geometry and its
            namespace for this rank: its blocks are read from the same tiers and converted
            (:mod:`kv_offload.vllm.imports`).
        label: what this worker's namespace holds (``namespace_label``), written in the disk
            tier's namespace directory and put in the remote tier, for operators and importers.
    """

    def __init__(
        self, config: OffloadConfig, geometry: KVGeometry, *, world_size: int = 1, rank: int = 0,
        namespace: bytes | None = None, imports: Sequence[tuple[KVGeometry, bytes]] = (),
        label: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.geometry = geometry
        self.rank = rank
        self.namespace = namespace
        #: the tiers below the pool, by name ("disk", "remote"), top to bottom
        self.tiers: dict[str, BlockTier] = {}
        #: per tier: counters already reported by take_tier_stats
        self._tier_seen: dict[str, dict[str, int]] = {}
        if (config.disk is not None or config.remote is not None) and namespace is None:
            raise ValueError("kv_offload: a disk or remote tier needs the worker's key namespace")
        if config.disk is not None:
            assert namespace is not None
            self.tiers["disk"] = open_disk_tier(
                config.disk, geometry.slot_bytes, namespace, world_size, io_delay_s=config.slow_io_ms / 1000,
                label=label,
            )  # fmt: skip
        if config.remote is not None:
            assert namespace is not None
            self.tiers["remote"] = open_remote_tier(config.remote, geometry.slot_bytes, namespace, label=label)
        # Below its own tiers: other engines' blocks, converted as a promotion reads them.
        self.tiers.update(open_import_tiers(config, geometry, imports, world_size, self._chunk_blocks))
        self._tier_io: dict[str, TierIO] = {}
        backend_cls = BACKENDS.resolve(config.backend, config.backend_module_path)
        self.backend: StorageBackend = backend_cls(backend_spec(config, geometry, world_size, rank))
        # A backend's on_stored (e.g. an msync to disk) runs off the engine step, in order.
        self._after_store: ThreadPoolExecutor | None = None
        if type(self.backend).on_stored is not StorageBackend.on_stored:
            self._after_store = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv_offload-on-stored")
        self.engine: TransferEngine | None = None
        self._layers: list[torch.Tensor] = []
        self._loads: dict[int, JobSpec] = {}
        self._stores: dict[int, JobSpec] = {}
        self._writebacks: dict[int, JobSpec] = {}
        #: promotions in flight, and the promotion each chunk job belongs to
        self._promotions: dict[int, _Promotion] = {}
        self._chunk_of: dict[int, int] = {}
        # Chunk job ids live far above the scheduler's (which count up from 1).
        self._chunk_ids = itertools.count(1 << 48)
        #: request -> its loads and promotions not settled yet (it is done receiving at 0)
        self._receiving: Counter[str] = Counter()
        self._outcomes: list[JobOutcome] = []
        self._finished_recving: set[str] = set()
        self._invalid_blocks: set[int] = set()
        #: job (load, store, promotion, write-back) -> when it times out (monotonic seconds)
        self._deadlines: dict[int, float] = {}
        self._started: dict[int, float] = {}
        #: engine and tier jobs settled at their deadline: their late results are dropped
        self._ignore_engine: set[int] = set()
        self._ignore_tier: set[int] = set()
        #: write-backs past their deadline still running in the tier (reported when they end)
        self._late_writebacks: set[int] = set()
        #: jobs failed at their deadline since start, by kind (load, store, promote, writeback)
        self.timed_out: Counter[str] = Counter()
        self._faults: list[ThreadFaults] = []

    @property
    def _chunk_blocks(self) -> int:
        """Blocks per chunk of a promotion (about ``PROMOTE_CHUNK_BYTES``)."""
        return max(1, PROMOTE_CHUNK_BYTES // self.geometry.slot_bytes)

    # -- set-up --------------------------------------------------------------------------
    def register(self, layers: Sequence[torch.Tensor]) -> None:
        """Open the pool and build the engine over the KV cache's per-layer tensors."""
        if not layers:
            raise ValueError("kv_offload: no KV cache tensors to register")
        pool = self.backend.open()
        for name, tier in self.tiers.items():
            self._tier_io[name] = TierIO(tier, pool)
        self._layers = list(layers)
        regions = regions_from_layers(layers, self.geometry)
        engine = make_engine(regions, pool, layers[0].device, self.config.transfer_threads)
        self._install_thread_faults(engine)
        if self.config.fail_load_every or self.config.fail_store_every:
            from kv_offload.testing.faults import FaultInjectingEngine

            engine = FaultInjectingEngine(
                engine, layers, fail_load_every=self.config.fail_load_every,
                fail_store_every=self.config.fail_store_every,
            )  # fmt: skip
        self.engine = engine
        logger.info(
            "kv_offload: pool of %d blocks (%d bytes each) for %d layers on %s%s",
            self.backend.num_slots(), self.geometry.slot_bytes, len(layers), layers[0].device,
            f"; rank {self.rank}'s lower-tier namespace {self.namespace.hex()}" if self.namespace else "",
        )  # fmt: skip

    def _install_thread_faults(self, engine: TransferEngine) -> None:
        """Test only: the config's ``hang_every`` / ``raise_in_transfer_every`` faults, run
        inside the copy thread and each tier's I/O thread."""
        if not (self.config.hang_every or self.config.raise_in_transfer_every):
            return
        from kv_offload.testing.faults import thread_faults

        hook = thread_faults(self.config, "copy")
        if hook is not None and hasattr(engine, "fault_hook"):
            engine.fault_hook = hook
            self._faults.append(hook)
        for name, io in self._tier_io.items():
            tier_hook = thread_faults(self.config, f"{name} I/O")
            if tier_hook is not None:
                io.fault_hook = tier_hook
                self._faults.append(tier_hook)

    def _engine(self) -> TransferEngine:
        if self.engine is None:
            raise RuntimeError("kv_offload: KV caches were never registered")
        return self.engine

    # -- per step ------------------------------------------------------------------------
    def flush(self, plan: StepPlan) -> None:
        """Wait until the stores in ``plan.flush`` finished (their blocks are rewritten next),
        at most until their deadline: past it, they are cancelled and fail."""
        if plan.flush:
            self._wait_bounded(plan.flush)

    def _wait_bounded(self, job_ids: Sequence[int]) -> None:
        """Wait for engine jobs until their deadline; then cancel what has not started (it
        fails, see :meth:`_expire`) and wait for copies already running (bounded)."""
        engine = self._engine()
        now = time.monotonic()
        latest = max((self._deadlines.get(j, now) for j in job_ids), default=now)
        if engine.wait_for(job_ids, latest - now):
            return
        self._expire_due(time.monotonic())
        running = [j for j in job_ids if j in self._loads or j in self._stores]
        if running:  # copying now (or an engine that cannot cancel): never left writing
            engine.wait(running)

    def start_loads(self, plan: StepPlan) -> None:
        """Submit the step's loads and promotions; wait for its synchronous loads.

        vLLM calls this before the forward pass when the step has synchronous loads (the
        requests they feed compute in this very step), after it otherwise."""
        for job in plan.loads + plan.promotes:
            assert job.req_id is not None
            if not job.sync:
                self._receiving[job.req_id] += 1
        for job in plan.loads:
            self._submit(job, Direction.LOAD, self._loads)
        sync = [job.job_id for job in plan.loads if job.sync]
        if sync:
            # Ordering: the forward pass reads these blocks; the copies must be complete
            # (and a failed or timed-out one's blocks zeroed and reported) before it starts.
            self._wait_bounded(sync)
            self.poll()
        for job in plan.promotes:
            # First leg: tier -> the reserved pool slots, on the tier's thread, chunk by
            # chunk; each chunk's second leg (pool -> KV cache) is submitted from poll() once
            # its read is verified, while the tier fetches the next chunk.
            self._loads[job.job_id] = job
            io = self._tier_io.get(job.tier)
            if not job.keys or io is None:  # the pool had no room for it
                self._settle(job.job_id, False, 0, 0.0, True)
                continue
            promo = self._promotions[job.job_id] = _Promotion(job, time.perf_counter())
            self._start_clock(job.job_id)
            step = self._chunk_blocks
            names = job.sources or job.keys  # an import reads each block's producer blocks
            for begin in range(0, len(job.keys), step):
                end = min(len(job.keys), begin + step)
                chunk = next(self._chunk_ids)
                promo.chunks[chunk] = (begin, end)
                promo.reading.add(chunk)
                self._chunk_of[chunk] = job.job_id
                io.read(chunk, names[begin:end], job.slots[begin:end])

    def submit_stores(self, plan: StepPlan) -> None:
        for job in plan.stores:
            self._submit(job, Direction.STORE, self._stores)
        for job in plan.writebacks:
            self._writebacks[job.job_id] = job
            io = self._tier_io.get(job.tier)
            if io is None:
                self._outcomes.append(JobOutcome(job.job_id, False, 0, 0.0, False))
                del self._writebacks[job.job_id]
            else:
                self._start_clock(job.job_id)
                io.write(job.job_id, job.keys, job.slots, job.evict)

    def _start_clock(self, job_id: int) -> None:
        now = time.monotonic()
        self._started[job_id] = now
        self._deadlines[job_id] = now + self.config.job_timeout_s

    def _submit(self, job: JobSpec, direction: Direction, table: dict[int, JobSpec]) -> None:
        table[job.job_id] = job
        self._start_clock(job.job_id)
        try:
            self._engine().submit(TransferJob.make(job.job_id, direction, job.device_blocks, job.slots))
        except Exception as exc:  # reported like a failed copy; the request recomputes
            logger.error("kv_offload: %s job %d rejected: %s: %s", direction.value, job.job_id, type(exc).__name__, exc)
            self._settle(job.job_id, False, 0, 0.0, direction is Direction.LOAD)

    def poll(self) -> None:
        """Collect finished jobs and fail those past their deadline (never blocks)."""
        for done in [d for io in self._tier_io.values() for d in io.poll()]:
            if done.job_id in self._ignore_tier:
                self._ignore_tier.discard(done.job_id)  # settled at its deadline
                continue
            if done.op is TierOp.WRITE:
                self._writebacks.pop(done.job_id)
                self._deadlines.pop(done.job_id, None)
                self._started.pop(done.job_id, None)
                late = done.job_id in self._late_writebacks
                self._late_writebacks.discard(done.job_id)
                if not done.success:
                    logger.debug("kv_offload: write-back %d: %s", done.job_id, done.error)
                self._outcomes.append(JobOutcome(done.job_id, done.success, done.nbytes, done.seconds, False, late))
                continue
            promo = self._promotions[self._chunk_of[done.job_id]]
            promo.reading.discard(done.job_id)
            if not done.success:
                if promo.success and not promo.timed_out:
                    logger.warning("kv_offload: promotion %d failed: %s (recomputed)", promo.job.job_id, done.error)
                promo.success = False
            if promo.success:  # this chunk's second leg: pool -> KV cache
                self._copy_chunk(promo, done.job_id)
            else:
                del self._chunk_of[done.job_id]
            self._finish_promotion(promo)
        for result in self._engine().poll():
            if result.job_id in self._ignore_engine:
                self._ignore_engine.discard(result.job_id)  # settled at its deadline
                continue
            if result.job_id in self._chunk_of:
                promo = self._promotions[self._chunk_of.pop(result.job_id)]
                promo.copying.discard(result.job_id)
                promo.nbytes += result.nbytes
                if not result.success:
                    logger.warning("kv_offload: promotion %d failed: %s (recomputed)", promo.job.job_id, result.error)
                    promo.success = False
                self._finish_promotion(promo)
                continue
            if not result.success:
                logger.warning("kv_offload: %s job %d failed: %s", result.direction.value, result.job_id, result.error)
            self._settle(result.job_id, result.success, result.nbytes, result.seconds,
                         result.direction is Direction.LOAD)  # fmt: skip
        self._expire_due(time.monotonic())

    def _copy_chunk(self, promo: _Promotion, chunk: int) -> None:
        begin, end = promo.chunks[chunk]
        try:
            self._engine().submit(TransferJob.make(
                chunk, Direction.LOAD, promo.job.device_blocks[begin:end], promo.job.slots[begin:end]
            ))  # fmt: skip
            promo.copying.add(chunk)
        except Exception as exc:
            logger.error("kv_offload: promotion %d rejected: %s: %s", promo.job.job_id, type(exc).__name__, exc)
            promo.success = False
            del self._chunk_of[chunk]

    # -- deadlines -----------------------------------------------------------------------
    def _expire_due(self, now: float) -> None:
        for job_id in [j for j, when in self._deadlines.items() if when <= now]:
            self._expire(job_id)

    def _expire(self, job_id: int) -> None:
        """Fail a job past its deadline, as far as that is safe now (see the module doc)."""
        waited = time.monotonic() - self._started.get(job_id, time.monotonic())
        promo = self._promotions.get(job_id)
        if promo is not None:
            self._expire_promotion(promo, waited)
            return
        writeback = self._writebacks.get(job_id)
        if writeback is not None:
            del self._deadlines[job_id]
            self.timed_out["writeback"] += 1
            logger.warning("kv_offload: write-back %d timed out after %.2f s", job_id, waited)
            if self._tier_io[writeback.tier].cancel([job_id]):
                self._ignore_tier.add(job_id)
                del self._writebacks[job_id]
                self._started.pop(job_id, None)
                self._outcomes.append(JobOutcome(job_id, False, 0, waited, False, True))
            else:  # blocked in the tier, reading its (pinned) slots: reported when it ends
                self._late_writebacks.add(job_id)
            return
        is_load = job_id in self._loads
        if not is_load and job_id not in self._stores:
            self._deadlines.pop(job_id, None)
            return
        if not self._engine().cancel([job_id]):
            return  # copying right now (or an engine that cannot cancel): it settles when done
        self._ignore_engine.add(job_id)
        kind = "load" if is_load else "store"
        self.timed_out[kind] += 1
        logger.warning(
            "kv_offload: %s job %d timed out after %.2f s (cancelled before its copy; %s)",
            kind, job_id, waited, "recomputed" if is_load else "not stored",
        )  # fmt: skip
        self._settle(job_id, False, 0, waited, is_load, timed_out=True)

    def _expire_promotion(self, promo: _Promotion, waited: float) -> None:
        job_id = promo.job.job_id
        del self._deadlines[job_id]
        promo.timed_out = True
        promo.success = False
        self.timed_out["promote"] += 1
        # Reads not started never write their slots; copies not started never write the KV
        # cache. A read blocked in the tier keeps the job open (its slots stay reserved).
        for chunk in self._tier_io[promo.job.tier].cancel(promo.reading):
            promo.reading.discard(chunk)
            self._chunk_of.pop(chunk, None)
            self._ignore_tier.add(chunk)
        for chunk in self._engine().cancel(promo.copying):
            promo.copying.discard(chunk)
            self._chunk_of.pop(chunk, None)
            self._ignore_engine.add(chunk)
        logger.warning(
            "kv_offload: promotion %d from %s timed out after %.2f s (recomputed; %d reads still in the tier)",
            job_id, promo.job.tier, waited, len(promo.reading),
        )  # fmt: skip
        self._finish_promotion(promo)

    def _finish_promotion(self, promo: _Promotion) -> None:
        """Hand the request back once no chunk can still be copied into its KV cache blocks
        (a failed one's blocks are zeroed after every copy into them ended); report the job
        once no read can still write its pool slots either."""
        job = promo.job
        if not promo.released and not promo.copying and (promo.timed_out or not promo.reading):
            promo.released = True
            self._release(job, promo.success)
        if promo.reading or promo.copying:
            return
        del self._promotions[job.job_id]
        del self._loads[job.job_id]
        self._deadlines.pop(job.job_id, None)
        self._started.pop(job.job_id, None)
        for chunk in promo.chunks:
            self._chunk_of.pop(chunk, None)
        # Both legs, overlapped: from submission to the last copy.
        seconds = time.perf_counter() - promo.started
        nbytes = promo.nbytes if promo.success else 0
        self._outcomes.append(JobOutcome(job.job_id, promo.success, nbytes, seconds, True, promo.timed_out))

    def _release(self, job: JobSpec, success: bool) -> None:
        """A load or promotion is over for vLLM: its request is done receiving once every
        load and promotion of it is (vLLM schedules it then, so its blocks must all be in
        place: a synchronous load's request was never waiting); a failed one's blocks are
        zeroed and reported invalid, so vLLM recomputes them."""
        assert job.req_id is not None
        if not job.sync:
            self._receiving[job.req_id] -= 1
            if self._receiving[job.req_id] <= 0:
                del self._receiving[job.req_id]
                self._finished_recving.add(job.req_id)
        if not success:
            self._clear_blocks(job.device_blocks)
            self._invalid_blocks.update(job.device_blocks)

    def _settle(
        self, job_id: int, success: bool, nbytes: int, seconds: float, is_load: bool, timed_out: bool = False
    ) -> None:
        self._deadlines.pop(job_id, None)
        self._started.pop(job_id, None)
        if is_load:
            job = self._loads.pop(job_id)
            self._release(job, success)
        else:
            job = self._stores.pop(job_id)
            if success and self._after_store is not None:
                self._after_store.submit(self._on_stored, job.slots)
        self._outcomes.append(JobOutcome(job_id, success, nbytes, seconds, is_load, timed_out))

    def _on_stored(self, slots: Sequence[int]) -> None:
        try:
            self.backend.on_stored(slots)
        except Exception:  # the blocks stay in the pool; only the backend's follow-up failed
            logger.exception("kv_offload: %s.on_stored failed", type(self.backend).__name__)

    def _clear_blocks(self, device_blocks: Sequence[int]) -> None:
        """Zero the destination blocks of a failed load before vLLM gets them back.

        A failed copy can leave anything there (NaN bit patterns included). vLLM recomputes
        the tokens, but it zeroes reused blocks only for Mamba or mixed-precision caches, and
        its attention reads whole blocks and masks the positions past the context: a masked
        NaN still poisons the output (0 * NaN is NaN). Zeros are safe under the mask.
        Ordering: the engine reported the job finished, so no copy into these blocks is in
        flight; on CUDA the fill runs on the current stream, before the next forward pass.
        """
        if not device_blocks or not self._layers:
            return
        index = torch.as_tensor(list(device_blocks), dtype=torch.long)
        for layer in self._layers:
            layer.index_fill_(0, index.to(layer.device), 0)

    @property
    def tier(self) -> BlockTier | None:
        """The disk tier (None without one)."""
        return self.tiers.get("disk")

    #: per tier: counters of its stats reported as deltas (data key suffix -> stats field)
    _TIER_DELTAS = {"evicted_blocks": "evictions", "corrupt_blocks": "corruptions", "errors": "errors",
                    "reconnects": "reconnects"}  # fmt: skip

    def take_tier_stats(self) -> dict[str, int] | None:
        """What the lower tiers saw since the last call: eviction, corruption, error and
        reconnect deltas (``disk_evicted_blocks``, ``remote_errors``, ...), and gauges (the
        disk's size, whether the remote store is connected). ``None`` without tiers."""
        if not self.tiers:
            return None
        data: dict[str, int] = {}
        for name, tier in self.tiers.items():
            if "." in name:
                continue  # an import (disk.import0): the same medium, another engine's blocks
            st = tier.stats().__dict__
            seen = self._tier_seen.setdefault(name, {})
            for suffix, field_name in self._TIER_DELTAS.items():
                if field_name in st and st[field_name] - seen.get(field_name, 0):
                    data[f"{name}_{suffix}"] = st[field_name] - seen.get(field_name, 0)
                    seen[field_name] = st[field_name]
            if name == "disk":
                data["disk_used_blocks"] = st["blocks"]
                data["disk_capacity_blocks"] = getattr(tier, "capacity_blocks", 0)
            elif "connected" in st:
                data[f"{name}_connected"] = st["connected"]
        return data

    def take_finished_recving(self) -> set[str]:
        done, self._finished_recving = self._finished_recving, set()
        return done

    def take_invalid_blocks(self) -> set[int]:
        bad, self._invalid_blocks = self._invalid_blocks, set()
        return bad

    def take_report(self) -> TransferReport | None:
        if not self._outcomes:
            return None
        outcomes, self._outcomes = self._outcomes, []
        return TransferReport(outcomes)

    @property
    def num_in_flight(self) -> int:
        return len(self._loads) + len(self._stores) + len(self._writebacks)

    def shutdown(self) -> None:
        """Finish every job in flight, then release the engine and the pool."""
        for fault in self._faults:  # test only: end injected stalls, the threads must finish
            fault.release()
        for io in self._tier_io.values():
            io.wait_all()
        if self.engine is not None:
            self.poll()  # promotions whose read finished go to the engine now
            self.engine.wait(list(self._loads) + list(self._stores) + list(self._chunk_of))
            self.poll()
            self.engine.shutdown()
            self.engine = None
        for io in self._tier_io.values():
            io.shutdown()
        self._tier_io = {}
        for tier in self.tiers.values():
            tier.close()
        if self._after_store is not None:
            self._after_store.shutdown(wait=True)  # every on_stored ran before the region goes
            self._after_store = None
        self.backend.close()
