# SPDX-License-Identifier: Apache-2.0
"""Plain, picklable messages between the connector's two halves.

Scheduler -> worker, once per engine step (:class:`StepPlan`, shipped inside vLLM's
``SchedulerOutput``): which block copies to start and which earlier stores to wait for
before the step's forward pass. Worker -> scheduler (:class:`TransferReport`, inside vLLM's
``KVConnectorOutput``): which jobs finished, how, and how many bytes they moved.

No vLLM import here: vLLM's marker base classes are mixed in by :mod:`kv_offload.vllm.connector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["JobSpec", "StepPlan", "JobOutcome", "TransferReport"]


@dataclass(frozen=True)
class JobSpec:
    """Copy ``device_blocks[i]`` <-> pool slot ``slots[i]`` (every layer).

    ``req_id`` is set for loads: the request waiting for them (reported back to vLLM as
    finished receiving once the job is done, successfully or not).
    """

    job_id: int
    device_blocks: tuple[int, ...]
    slots: tuple[int, ...]
    req_id: str | None = None
    #: block keys (tier jobs: what to read from or write to the tier below the pool)
    keys: tuple[bytes, ...] = ()
    #: tier jobs: which tier below the pool ("disk", "remote")
    tier: str = ""
    #: a load vLLM scheduled in the same step (``load_kv_async`` False): the worker copies
    #: it before the forward pass and does not report the request as finished receiving
    sync: bool = False
    #: an import's promotion (tier ``disk.import0``, ...): per block, the producer keys it is
    #: converted from, joined (see :mod:`kv_offload.vllm.imports`)
    sources: tuple[bytes, ...] = ()
    #: a write-back: the blocks of ours the worker removes from the tier before writing, to
    #: make room (the scheduler chooses them: the tier itself evicts nothing it may offer)
    evict: tuple[bytes, ...] = ()


@dataclass
class StepPlan:
    """What the worker does this step.

    * ``flush``: store jobs (submitted in earlier steps) that must finish before this
      step's forward pass, because a block they read is about to be written again.
    * ``loads``: pool -> KV cache; started after the forward pass is launched (vLLM calls
      ``start_load_kv`` then), their requests wait in ``WAITING_FOR_REMOTE_KVS``.
    * ``stores``: KV cache -> pool for blocks this step's forward pass fills; submitted
      from ``wait_for_save``, after the forward pass, without waiting for them.
    * ``promotes``: a lower tier (disk, remote) -> pool slots (reserved like a store) -> KV
      cache, started with the loads; the request waits until all of its loads and
      promotions are done.
    * ``writebacks``: pool slots of completed stores -> a lower tier (write-through), off
      the step.
    """

    flush: tuple[int, ...] = ()
    loads: tuple[JobSpec, ...] = ()
    stores: tuple[JobSpec, ...] = ()
    #: lower tier -> pool slots -> KV cache, for a request waiting like a load (``keys``: what to read)
    promotes: tuple[JobSpec, ...] = ()
    #: pool slots -> lower tier, for blocks whose store completed (no KV cache block is touched)
    writebacks: tuple[JobSpec, ...] = ()

    def is_empty(self) -> bool:
        return not (self.flush or self.loads or self.stores or self.promotes or self.writebacks)


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    success: bool
    nbytes: int
    seconds: float
    is_load: bool
    #: the worker failed the job at its deadline (``job_timeout_s``); reported only once
    #: nothing of it can still write the job's pool slots
    timed_out: bool = False


@dataclass
class TransferReport:
    """Jobs finished on the workers since the last report.

    With several workers (tensor parallelism) vLLM folds their reports with
    :meth:`merge`; the scheduler counts a job done once every worker reported it.
    """

    outcomes: list[JobOutcome] = field(default_factory=list)

    def merge(self, other: TransferReport) -> TransferReport:
        return TransferReport(self.outcomes + other.outcomes)
