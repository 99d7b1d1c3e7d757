# SPDX-License-Identifier: Apache-2.0
"""The connector's scheduler half: which blocks to load and store, and when it is safe.

Runs in vLLM's scheduler (engine-core) process and touches no tensor: it asks the
:class:`~kv_offload.manager.OffloadManager` what the pool holds, plans block copies as
:class:`~kv_offload.vllm.metadata.JobSpec` s, and settles them when the workers report back.
It knows nothing of vLLM's classes either; the facade hands it requests (anything with the
attributes of :class:`RequestView`) and plain block-id lists, so it is unit-tested alone.

Ordering rules it enforces (see docs/architecture.md):

1. A load only targets blocks the scheduler just allocated to a request that waits for it;
   vLLM keeps those blocks until the request is reported as finished receiving.
2. A store reads blocks whose tokens are computed by the end of the step it is planned in;
   the worker submits it after that step's forward pass.
3. Fence: a device block read by a store that has not been reported done is never written
   again before the store finished. Each step, the blocks the step will write (scheduled
   tokens, fresh blocks vLLM zeroes, load destinations) are checked against pending stores;
   hits go into ``StepPlan.flush`` and the worker waits for them before the forward pass.
   This covers finished, aborted and preempted requests alike, with no delayed frees.
4. Pool slots: a load protects its blocks from eviction until the job is settled; a store's
   slots are reserved (not readable) until it is settled; failures free them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from kv_offload.config import OffloadConfig
from kv_offload.keys import DIGEST_BYTES, ExtraKeys, KeyChain
from kv_offload.manager import OffloadManager
from kv_offload.vllm.counters import OffloadCounters
from kv_offload.vllm.jobs import Job as _Job
from kv_offload.vllm.jobs import Kind as _Kind
from kv_offload.vllm.lower_tiers import REMOTE_RETRY_S, TIER_ORDER, LowerTier, TierIndex
from kv_offload.vllm.metadata import JobSpec, StepPlan, TransferReport
from kv_offload.vllm.request_state import ReqState as _ReqState
from kv_offload.vllm.request_state import RequestView, ScheduledRequest

if TYPE_CHECKING:
    from kv_offload.vllm.imports import ImportIndex

__all__ = ["REMOTE_RETRY_S", "TIER_ORDER", "OffloadCounters", "RequestView", "ScheduledRequest", "SchedulerHalf",
           "TierIndex"]  # fmt: skip

logger = logging.getLogger(f"vllm.{__name__}")

#: The backstop waits 2 x job_timeout_s plus this for a report: a worker reports a job it
#: timed out at its next step, which a stalled step (e.g. a flush at its deadline) delays.
BACKSTOP_SLACK_S = 5.0


class SchedulerHalf:
    """Plans loads and stores for one engine.

    Args:
        config: the validated connector configuration.
        manager: bookkeeping of the pool (``num_slots`` from the backend).
        block_size: tokens per KV block.
        namespace: the 16-byte namespace digest every key starts with (see :mod:`kv_offload.keys`).
        extra_keys: per request, what else changes its blocks' KV (LoRA, multimodal inputs,
            ``cache_salt``, ...): a :data:`~kv_offload.keys.ExtraKeys` function, or ``None``
            when nothing does. The facade passes vLLM's own extra keys.
        world_size: workers that each report every job (tensor/pipeline parallel ranks).
        disk: the disk tier's index (None: no disk tier). Completed stores are written
            through to it; a prefix the pool lacks but the disk holds is promoted through
            the pool.
        remote: the remote tier's index (None: no remote tier), below the disk: the same.
        remote_write: write completed stores through to the remote tier (false: a
            read-only consumer of a store others fill).
        imports: other engines' blocks in the disk or remote tier, in another page geometry
            (:class:`~kv_offload.vllm.imports.ImportIndex`), looked up below this engine's
            own tiers and promoted under its own keys (converted by the workers).
        clock: monotonic seconds, for the backstop on jobs no worker reports (tests step it).
    """

    def __init__(
        self,
        config: OffloadConfig,
        manager: OffloadManager,
        *,
        block_size: int,
        namespace: bytes = bytes(DIGEST_BYTES),
        extra_keys: Callable[[RequestView], ExtraKeys | None] | None = None,
        world_size: int = 1,
        disk: TierIndex | None = None,
        remote: TierIndex | None = None,
        remote_write: bool = True,
        imports: Sequence[ImportIndex] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(namespace) != DIGEST_BYTES:
            raise ValueError(f"namespace must be a {DIGEST_BYTES}-byte digest, got {len(namespace)} bytes")
        self.config = config
        self.manager = manager
        self.block_size = block_size
        self.namespace = namespace
        self._extra_keys = extra_keys
        self.world_size = world_size
        self.disk = disk
        self.remote = remote
        #: the lower tiers in lookup order (disk above remote)
        self.tiers: dict[str, LowerTier] = {}
        if disk is not None:
            self.tiers["disk"] = LowerTier("disk", disk)
        if remote is not None:
            self.tiers["remote"] = LowerTier("remote", remote, write=remote_write, failed_ttl_s=REMOTE_RETRY_S)
        self.imports = {index.name: index for index in imports}
        for index in imports:
            ttl = REMOTE_RETRY_S if index.medium == "remote" else None
            self.tiers[index.name] = LowerTier(index.name, index, write=False, failed_ttl_s=ttl, imported=True)
        self._reqs: dict[str, _ReqState] = {}
        #: request -> (first block, pool hits, hits of each lower tier in order, load sync)
        self._matches: dict[str, tuple[int, int, tuple[int, ...], bool]] = {}
        self._jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count(1)
        self._last_job_id = 0
        #: jobs the backstop timed out whose slots stay out of use until a report arrives
        self._quarantine: dict[int, _Job] = {}
        self._clock = clock
        #: how long a job may go unreported: the workers fail their own at job_timeout_s
        self.backstop_s = 2 * config.job_timeout_s + BACKSTOP_SLACK_S
        self._gauges_taken: dict[str, int] = {}
        #: device block -> store jobs still reading it
        self._reading: defaultdict[int, set[int]] = defaultdict(set)
        self._step_loads: list[JobSpec] = []
        self._step_promotes: list[JobSpec] = []
        self._counters = OffloadCounters()
        self._evictions_seen = manager.stats.evictions
        self._invalidated_seen = manager.stats.invalidated

    # -- keys ----------------------------------------------------------------------------
    def _state(self, request: RequestView) -> _ReqState:
        state = self._reqs.get(request.request_id)
        if state is None:
            extra = self._extra_keys(request) if self._extra_keys is not None else None
            chain = KeyChain(self.namespace, self.block_size, extra)
            state = self._reqs[request.request_id] = _ReqState(request, chain)
        return state

    def block_keys(self, request: RequestView, limit: int | None = None) -> list[bytes]:
        """Content keys of the request's first ``limit`` full blocks (all full blocks by
        default); each block is hashed once over the request's life. Shorter when a block
        cannot be keyed: nothing from there on is matched or stored."""
        n = request.num_tokens // self.block_size if limit is None else limit
        return self._state(request).chain.keys(request.all_token_ids, n)

    # -- admission (vLLM: get_num_new_matched_tokens / update_state_after_alloc) -----------
    def match(self, request: RequestView, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (block aligned) the pool can supply.

        At least one token is always left to compute. Returns ``(tokens, load_async)``;
        ``(None, False)`` while the tier below cannot answer yet (vLLM asks again next step).
        """
        self._matches.pop(request.request_id, None)
        bs = self.block_size
        start = num_computed_tokens // bs
        limit = (request.num_tokens - 1) // bs
        if start >= limit:
            return 0, False
        keys = self.block_keys(request, limit)[start:]
        hits = self.manager.lookup(keys)
        total = hits
        runs: list[int] = []
        # Promotions need free or evictable pool slots: offer no more than the slots not
        # held by jobs in flight nor by this hit's pool blocks. (Offering more made the
        # promotion fail whole, and the request recompute after waiting for it.)
        room = self.manager.num_slots - self._held_slots() - hits
        # Nor a block the pool already has a slot for (being stored by another request):
        # promoting it could not reserve that slot and would fail.
        end = total
        while end < len(keys) and not self.manager.holds(keys[end]):
            end += 1
        if end == total < len(keys) and self.tiers:
            return None, False  # the very next block is being stored: ask again next step
        for tier in self.tiers.values():
            # A lower tier is asked only for what the tiers above lack.
            if tier.imported and total < end and room > 0:
                extra = self._extra_keys(request) if self._extra_keys is not None else None
                self.imports[tier.name].prepare(request.request_id, request.all_token_ids, start + total,
                                                keys[total:end], extra)  # fmt: skip
            run = self._tier_run(tier, keys[total:end]) if total < end and room > 0 else 0
            if run is None:
                return None, False
            run = max(0, min(run, room))
            room -= run
            runs.append(run)
            total += run
        if total == 0 or total * bs < self.config.min_load_tokens:
            return 0, False
        # A small hit all in the pool is copied before this step's forward pass (vLLM then
        # schedules the request at once); anything else waits in WAITING_FOR_REMOTE_KVS.
        limit = self.config.sync_load_max_bytes * self.world_size
        sync = total == hits and limit > 0 and hits * self.manager.block_bytes <= limit
        self._matches[request.request_id] = (start, hits, tuple(runs), sync)
        return total * bs, not sync

    @staticmethod
    def _tier_run(tier: LowerTier, keys: Sequence[bytes]) -> int | None:
        """How many leading ``keys`` ``tier`` holds (``None``: not known yet)."""
        n = 0
        while n < len(keys) and tier.ours(keys[n]) and not tier.refuses(keys[n]):
            n += 1  # ours, written since the index last looked: known without asking
        if n == len(keys):
            return n
        held = tier.index.contains(keys[n:])
        if held is None:
            return None
        for key, there in zip(keys[n:], held):
            if not (there or tier.ours(key)) or tier.refuses(key) or tier.evicted(key):
                break
            n += 1
        return n

    def on_alloc(self, request: RequestView, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Blocks were allocated for ``request``; plan the load of its pool hit, if any."""
        req_id = request.request_id
        state = self._state(request)
        match = self._matches.pop(req_id, None)
        if num_external_tokens <= 0:
            return
        # (Re)admission: blocks may be new (after a preemption); offer every block again.
        state.rewind()
        if match is None or num_external_tokens % self.block_size:
            raise RuntimeError(
                f"kv_offload: request {req_id} was given {num_external_tokens} external tokens"
                " that the pool did not offer"
            )
        start, hits, runs, sync = match
        n = num_external_tokens // self.block_size
        if n > hits + sum(runs):
            raise RuntimeError(f"kv_offload: request {req_id}: {n} blocks to load but only {hits + sum(runs)} hit")
        keys = tuple(self.block_keys(request, start + n)[start:])
        device_blocks = tuple(int(b) for b in block_ids[start : start + n])
        from_pool = min(n, hits)
        if from_pool:
            slots = self.manager.prepare_load(keys[:from_pool])
            job_id = self._new_job(_Kind.LOAD, keys[:from_pool], device_blocks[:from_pool])
            self._step_loads.append(JobSpec(job_id, device_blocks[:from_pool], tuple(slots), req_id, sync=sync))
        begin = from_pool
        for tier, run in zip(self.tiers.values(), runs):
            end = min(n, begin + run)
            if end > begin:
                self._plan_promote(tier.name, req_id, keys[begin:end], device_blocks[begin:end], state)
                tokens = (end - begin) * self.block_size
                if tier.medium == "disk":
                    self._counters.disk_hit_tokens += tokens
                else:
                    self._counters.remote_hit_tokens += tokens
                if tier.imported:
                    self._counters.import_hit_tokens += tokens
            begin = end
        self._counters.hit_tokens += num_external_tokens

    def _plan_promote(
        self, tier: str, req_id: str, keys: tuple[bytes, ...], device_blocks: tuple[int, ...], state: _ReqState
    ) -> None:
        """Reserve pool slots for ``tier``'s blocks and plan their promotion into ``device_blocks``.

        The slots are reserved like a store's (not readable until the promotion settles); the
        request's earlier blocks are kept. The leading blocks that got slots are promoted; the
        rest (no room) go in a job without keys that fails at once on the worker, and vLLM
        recomputes from there.
        """
        plan = self.manager.prepare_store(keys, keep=state.kept)
        got = plan.keys if plan is not None else ()
        n = 0  # the leading blocks that got slots, in order, are promoted
        while n < len(got) and got[n] == keys[n]:
            n += 1
        # An import reads each block's producer blocks (known since the lookup).
        sources = self.imports[tier].sources(keys[:n]) if tier in self.imports and n else ()
        if sources is None:
            n = 0
        if plan is not None and len(got) > n:
            self.manager.complete_store(got[n:], success=False)
        if n:
            assert plan is not None and sources is not None
            job_id = self._new_job(_Kind.PROMOTE, keys[:n], device_blocks[:n], tier)
            self._step_promotes.append(JobSpec(job_id, device_blocks[:n], plan.slots[:n], req_id, keys[:n], tier=tier,
                                               sources=sources))  # fmt: skip
        if n < len(keys):  # no room (or the pool got them meanwhile): fails at once, recomputed
            job_id = self._new_job(_Kind.PROMOTE, (), device_blocks[n:], tier)
            self._step_promotes.append(JobSpec(job_id, device_blocks[n:], (), req_id, tier=tier))

    def _held_slots(self) -> int:
        """Pool slots jobs in flight (and timed-out ones) hold: protected, reserved or pinned;
        and those pinned for a write-back the next step plans."""
        queued = sum(len(tier.queue) for tier in self.tiers.values())
        return sum(len(job.keys) for job in self._jobs.values()) + self.num_quarantined_slots + queued

    def _new_job(self, kind: _Kind, keys: tuple[bytes, ...], device_blocks: tuple[int, ...], tier: str = "") -> int:
        job_id = self._last_job_id = next(self._job_ids)
        self._jobs[job_id] = _Job(kind, keys, device_blocks, tier=tier, deadline=self._clock() + self.backstop_s)
        return job_id

    def on_finished(self, request: RequestView) -> None:
        """``request`` finished or was aborted. Its jobs stay tracked until they settle."""
        self._reqs.pop(request.request_id, None)
        self._matches.pop(request.request_id, None)
        for index in self.imports.values():
            index.finish(request.request_id)

    # -- per step (vLLM: build_connector_meta) ---------------------------------------------
    def build_plan(
        self, scheduled: Iterable[ScheduledRequest], zeroed_blocks: Iterable[int] = ()
    ) -> StepPlan:
        """The step's plan: fences first, then this step's loads and stores."""
        scheduled = list(scheduled)
        self._expire_jobs()
        bs = self.block_size
        loads, self._step_loads = self._step_loads, []
        promotes, self._step_promotes = self._step_promotes, []
        written: set[int] = {int(b) for b in zeroed_blocks}
        for job in loads + promotes:
            written.update(job.device_blocks)
        for s in scheduled:
            if s.num_new_tokens <= 0:
                continue
            first = s.num_computed_tokens // bs
            last = (s.num_computed_tokens + s.num_new_tokens - 1) // bs
            written.update(int(b) for b in s.block_ids[first : last + 1])
        flush: set[int] = set()
        for block in written & self._reading.keys():
            flush |= self._reading[block]
        self._counters.flushes += len(flush)
        stores = [store for s in scheduled if (store := self._plan_store(s)) is not None]
        writebacks = self._plan_writebacks()
        self._note_evictions()
        return StepPlan(
            flush=tuple(sorted(flush)), loads=tuple(loads), stores=tuple(stores),
            promotes=tuple(promotes), writebacks=writebacks,
        )  # fmt: skip

    def _plan_writebacks(self) -> tuple[JobSpec, ...]:
        """Write settled stores through to each lower tier: their pool slots stay pinned (not
        evicted nor reused) from the store's settling (:meth:`LowerTier.enqueue`) until the
        write-back settles. The blocks it removes to make room are chosen here, among those
        no promotion in flight reads (:meth:`LowerTier.plan_write`)."""
        jobs = []
        for tier in self.tiers.values():
            if not tier.queue:
                continue
            jobs_now = itertools.chain(self._jobs.values(), self._quarantine.values())
            busy = {k for job in jobs_now if job.kind is _Kind.PROMOTE and job.tier == tier.name for k in job.keys}
            keys, victims = tier.plan_write(tuple(tier.queue), busy)
            if not keys:
                continue  # no room yet: the next step tries again
            slots = tuple(tier.queue.pop(key) for key in keys)
            job_id = self._new_job(_Kind.WRITEBACK, tuple(keys), (), tier.name)
            self._jobs[job_id].evict = tuple(victims)
            jobs.append(JobSpec(job_id, (), slots, None, tuple(keys), tier=tier.name, evict=tuple(victims)))
        return tuple(jobs)

    def _plan_store(self, s: ScheduledRequest) -> JobSpec | None:
        state = self._state(s.request)
        bs = self.block_size
        full = (s.num_computed_tokens + s.num_new_tokens) // bs
        if self.config.offload_prompt_only:
            full = min(full, s.request.num_prompt_tokens // bs)
        full = min(full, len(s.block_ids))
        keys = self.block_keys(s.request, full)
        if len(keys) < full and not state.unkeyable_counted:
            # What kv-offload cannot key correctly it does not store (nor match).
            state.unkeyable_counted = True
            self._counters.stores_skipped += s.request.num_prompt_tokens // bs - len(keys)
        full = len(keys)
        if full <= state.offered:
            return None
        begin = state.offered
        offer = keys[begin:full]
        # The prompt's earlier blocks are kept: evicting them for its later blocks would
        # leave a tail no prefix lookup can reach. A pool smaller than the prompt keeps
        # the leading blocks that fit; the first block that found no room is offered
        # again next step, and no later block is stored before it (a gap breaks the chain).
        plan = self.manager.prepare_store(offer, keep=state.kept)
        end = full
        if plan is None or plan.skipped:
            # None: not even the first new block fit (blocks the pool holds were only touched).
            refused = {k for k in offer if not self.manager.holds(k)} if plan is None else set(plan.skipped)
            at = [begin + i for i, key in enumerate(offer) if key in refused]
            end = at[0]
            self._counters.stores_skipped += sum(1 for i in at if i >= state.counted)
            state.counted = max(state.counted, full)
        state.kept.update(keys[begin:end])
        state.offered = end
        if plan is None or not plan.keys:
            return None
        where = {key: int(s.block_ids[begin + i]) for i, key in enumerate(offer)}
        device_blocks = tuple(where[key] for key in plan.keys)
        job_id = self._new_job(_Kind.STORE, plan.keys, device_blocks)
        for block in device_blocks:
            self._reading[block].add(job_id)
        return JobSpec(job_id, device_blocks, plan.slots)

    # -- results (vLLM: update_connector_output) -------------------------------------------
    def on_report(self, report: TransferReport) -> None:
        """Settle jobs once every worker reported them."""
        for outcome in report.outcomes:
            job = self._jobs.get(outcome.job_id)
            late = job is None
            if job is None:
                job = self._quarantine.get(outcome.job_id)
            if job is None:
                if 0 < outcome.job_id <= self._last_job_id:
                    logger.debug("kv_offload: late report for job %d, settled already: ignored", outcome.job_id)
                    continue
                raise RuntimeError(f"kv_offload: report for unknown job {outcome.job_id}")
            if outcome.timed_out and not job.timed_out:  # a worker failed it at its deadline
                job.timed_out = True
                setattr(self._counters, job.counter, getattr(self._counters, job.counter) + 1)
            job.reports += 1
            # A job the backstop timed out settles as a failure whatever it reports.
            job.success = job.success and outcome.success and not late
            if outcome.success and not late:
                # Per-job throughput by path: load (pool -> KV cache), store, promote (disk ->
                # pool -> KV cache, both legs), writeback (pool -> disk), and the same two for
                # the remote tier.
                # The remote tier's paths are "remote_promote" and "remote_writeback".
                medium = job.tier.split(".", 1)[0]  # an import's medium: "disk.import0" -> "disk"
                path = job.kind.value if medium in ("", "disk") else f"{medium}_{job.kind.value}"
                self._counters.transfers.append((path, outcome.nbytes, outcome.seconds))
            if outcome.success and not late and job.kind is not _Kind.WRITEBACK:
                loading = job.kind is not _Kind.STORE
                if loading:
                    self._counters.loaded_bytes += outcome.nbytes
                    self._counters.load_seconds += outcome.seconds
                else:
                    self._counters.stored_bytes += outcome.nbytes
                    self._counters.store_seconds += outcome.seconds
            if job.reports < self.world_size:
                continue
            if late:
                logger.debug("kv_offload: late report for timed-out job %d: its slots are freed", outcome.job_id)
                del self._quarantine[outcome.job_id]
            else:
                del self._jobs[outcome.job_id]
            self._settle(outcome.job_id, job)

    def _expire_jobs(self) -> None:
        """The backstop: a job no worker reported in ``backstop_s`` is timed out (see
        :mod:`kv_offload.vllm.jobs`): counted, no longer pending, its store fence lifted (a late
        report can only fail it, so nothing it read is ever used), its slots quarantined."""
        now = self._clock()
        for job_id in [j for j, job in self._jobs.items() if job.deadline <= now]:
            job = self._jobs.pop(job_id)
            self._quarantine[job_id] = job
            if not job.timed_out:
                job.timed_out = True
                setattr(self._counters, job.counter, getattr(self._counters, job.counter) + 1)
            self._lift_fences(job_id, job)
            logger.warning(
                "kv_offload: no worker reported %s job %d within %.1f s: settled as failed; its %d pool"
                " slots stay out of use until a report arrives", job.kind.value, job_id, self.backstop_s, len(job.keys),
            )  # fmt: skip

    def _lift_fences(self, job_id: int, job: _Job) -> None:
        for block in job.device_blocks if job.kind is _Kind.STORE else ():
            readers = self._reading.get(block)
            if readers is not None:
                readers.discard(job_id)
                if not readers:
                    del self._reading[block]

    def _settle(self, job_id: int, job: _Job) -> None:
        counters = self._counters
        if job.kind is _Kind.LOAD:
            self.manager.complete_load(job.keys, job.success)
            counters.load_jobs += 1
            if job.success:
                counters.loaded_blocks += len(job.keys)
            else:
                counters.failed_loads += 1
        elif job.kind is _Kind.PROMOTE:
            # The promoted blocks now sit in their reserved pool slots: they become pool
            # blocks like any stored one. A failed promotion frees the slots; the tier's
            # copy is not trusted again by this scheduler until it is written anew.
            tier = self.tiers[job.tier]
            if job.keys:
                self.manager.complete_store(job.keys, job.success)
            counters.load_jobs += 1
            nbytes = len(job.keys) * self.manager.block_bytes
            if job.success and job.keys:
                counters.loaded_blocks += len(job.keys)
                counters.promoted_blocks += len(job.keys)
                if tier.imported:
                    counters.imported_blocks += len(job.keys)
                tier.read(job.keys)
                if tier.medium == "disk":
                    counters.disk_read_bytes += nbytes
                else:
                    counters.remote_read_bytes += nbytes
                # Blocks promoted from the remote tier are written through to the tiers
                # above it (a restart then finds them on disk).
                for upper in self.tiers.values():
                    if upper is tier:
                        break
                    if upper.write:
                        counters.writebacks_skipped += upper.enqueue(job.keys, self.manager)
            else:
                counters.failed_loads += 1
                counters.failed_promotes += 1
                if tier.medium == "remote":
                    counters.remote_failed_promotes += 1
                if tier.imported:
                    counters.failed_imports += 1
                tier.read_failed(job.keys, self._limit)
        elif job.kind is _Kind.WRITEBACK:
            tier = self.tiers[job.tier]
            self.manager.unpin(job.keys)
            tier.settle_write(job.keys, job.evict, job.success, time.monotonic(), self._limit)
            if job.success:
                counters.written_back_blocks += len(job.keys)
                nbytes = len(job.keys) * self.manager.block_bytes
                if tier.medium == "disk":
                    counters.disk_written_bytes += nbytes
                else:
                    counters.remote_written_bytes += nbytes
            else:
                counters.failed_writebacks += 1
                if tier.medium == "remote":
                    counters.remote_failed_writebacks += 1
        else:
            self.manager.complete_store(job.keys, job.success)
            counters.store_jobs += 1
            if job.success:
                counters.stored_blocks += len(job.keys)
                for tier in self.tiers.values():
                    if tier.write:
                        counters.writebacks_skipped += tier.enqueue(job.keys, self.manager)
            else:
                counters.failed_stores += 1
            self._lift_fences(job_id, job)

    @property
    def _limit(self) -> int:
        """How many keys a tier's records keep at most."""
        return max(1024, 4 * self.manager.num_slots)

    # -- maintenance ---------------------------------------------------------------------
    def reset(self) -> int:
        """vLLM's prefix-cache reset: drop every idle block of the pool."""
        dropped = self.manager.clear()
        self._note_evictions()
        return dropped

    def _note_evictions(self) -> None:
        stats = self.manager.stats
        self._counters.evicted_blocks += stats.evictions - self._evictions_seen
        self._counters.invalidated_blocks += stats.invalidated - self._invalidated_seen
        self._evictions_seen, self._invalidated_seen = stats.evictions, stats.invalidated

    def take_counters(self) -> OffloadCounters:
        """Counters since the last call, and the gauges now (``changed``: any gauge moved)."""
        self._note_evictions()
        self._expire_jobs()
        counters, self._counters = self._counters, OffloadCounters()
        gauges = {
            "pool_reading_blocks": self.manager.num_reading, "pool_writing_blocks": self.manager.num_writing,
            "pending_jobs": self.num_pending_jobs, "quarantined_slots": self.num_quarantined_slots,
        }  # fmt: skip
        for name, value in gauges.items():
            setattr(counters, name, value)
        counters.gauges_changed = gauges != self._gauges_taken
        self._gauges_taken = gauges
        return counters

    @property
    def num_quarantined_slots(self) -> int:
        """Pool slots held by jobs the backstop timed out (until their late report)."""
        return sum(len(job.keys) for job in self._quarantine.values())

    @property
    def num_pending_jobs(self) -> int:
        """Jobs in flight, and write-backs queued for the next step."""
        return len(self._jobs) + sum(1 for tier in self.tiers.values() if tier.queue)

    def pending_blocks(self) -> set[int]:
        """Device blocks read by stores not yet settled."""
        return set(self._reading)

    def check_settled(self) -> None:
        """Assert the accounting is back to rest: no job, reservation or fence left over."""
        assert not self._jobs, f"{len(self._jobs)} jobs not settled"
        assert not self._quarantine, f"{len(self._quarantine)} timed-out jobs still hold {self.num_quarantined_slots} slots"
        assert not self._reading, f"fences left on blocks {sorted(self._reading)[:8]}"
        assert not self._step_loads and not self._step_promotes, "loads planned but never shipped"
        assert not any(t.queue for t in self.tiers.values()), "write-backs queued but never planned"
        assert self.manager.num_reading == 0, f"{self.manager.num_reading} blocks still protected for loads"
        assert self.manager.num_writing == 0, f"{self.manager.num_writing} blocks still reserved for stores"
        self.manager.check_invariants()
