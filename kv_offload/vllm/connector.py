# SPDX-License-Identifier: Apache-2.0
"""``KVOffloadConnector``: vLLM's KV-connector interface over kv-offload's two halves.

vLLM builds one instance per role: in the scheduler (role SCHEDULER) it wraps a
:class:`~kv_offload.vllm.scheduler.SchedulerHalf`, in each worker (role WORKER) a
:class:`~kv_offload.vllm.worker.WorkerHalf`. The halves talk only through the plain
dataclasses of :mod:`kv_offload.vllm.metadata`, wrapped here in vLLM's marker classes.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVOffloadConnector",
      "kv_connector_module_path": "kv_offload.vllm", "kv_role": "kv_both",
      "kv_connector_extra_config": {"cpu_bytes": "4GiB"}}'
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from kv_offload.backends import BACKENDS, StorageBackend
from kv_offload.config import ConfigError, OffloadConfig
from kv_offload.geometry import KVGeometry
from kv_offload.manager import OffloadManager
from kv_offload.policies import POLICIES
from kv_offload.registry import RegistryError
from kv_offload.tiers.base import BlockTier
from kv_offload.tiers.remote.lookup import RemoteIndex
from kv_offload.vllm import compat
from kv_offload.vllm.compat import (
    HOST_HIT_SOURCE,
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorStats,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from kv_offload.vllm.imports import ImportIndex, import_geometries, import_tier_name, producer_namespace
from kv_offload.vllm.metadata import StepPlan, TransferReport
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.stats import KVOffloadPromMetrics, KVOffloadStats
from kv_offload.vllm.worker import WorkerHalf
from kv_offload.vllm.worker_setup import backend_spec, namespace_label, open_disk_tier, open_remote_tier

__all__ = [
    "KVOffloadConnector", "KVOffloadMetadata", "KVOffloadWorkerMetadata", "build_manager", "check_components",
    "warn_if_pool_below_one_prompt",
]  # fmt: skip

# A child of vLLM's logger, so messages show in vLLM's log with its format.
logger = logging.getLogger(f"vllm.{__name__}")


@dataclass
class KVOffloadMetadata(StepPlan, KVConnectorMetadata):
    """A :class:`StepPlan` as vLLM ships it to the workers."""


@dataclass
class KVOffloadWorkerMetadata(TransferReport, KVConnectorWorkerMetadata):
    """A :class:`TransferReport` as vLLM hands it back to the scheduler."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TransferReport)
        return KVOffloadWorkerMetadata(self.outcomes + other.outcomes)


def check_components(config: OffloadConfig, geometry: KVGeometry, world_size: int) -> int:
    """Resolve the backend and the policy and size the pool; returns slots per worker.

    Allocates nothing. Bad names, options and sizes raise ``ConfigError`` naming the key,
    in whichever process builds its connector first.
    """
    try:
        backend_cls = BACKENDS.resolve(config.backend, config.backend_module_path)
    except RegistryError as exc:
        raise ConfigError("backend", str(exc)) from None
    try:
        backend: StorageBackend = backend_cls(backend_spec(config, geometry, world_size, 0))
        num_slots = backend.num_slots()
    except ConfigError:
        raise  # the backend named the key
    except (ValueError, TypeError) as exc:
        raise ConfigError("backend", f"{backend_cls.__name__} rejected its spec: {exc}") from None
    if num_slots <= 0:
        raise ConfigError("cpu_bytes", f"{config.cpu_bytes} bytes hold no KV block of {geometry.slot_bytes} bytes")
    try:
        POLICIES.resolve(config.eviction_policy, config.eviction_policy_module_path)
    except RegistryError as exc:
        raise ConfigError("eviction_policy", str(exc)) from None
    import_geometries(config, geometry)  # a producer block size that does not divide ours, ...
    return num_slots


def build_manager(config: OffloadConfig, geometry: KVGeometry, world_size: int) -> OffloadManager:
    """The scheduler's manager, sized by the backend."""
    num_slots = check_components(config, geometry, world_size)
    policy_cls = POLICIES.resolve(config.eviction_policy, config.eviction_policy_module_path)
    return OffloadManager(
        num_slots,
        policy_cls(num_slots),
        block_bytes=geometry.block_bytes * world_size,
        store_threshold=config.store_threshold,
        max_tracker_size=config.max_tracker_size,
    )


def warn_if_pool_below_one_prompt(num_slots: int, block_size: int, max_model_len: int | None) -> bool:
    """Warn (once, at start-up) when the pool cannot hold the blocks of one longest prompt.

    Such a pool still works: a prompt keeps its leading blocks that fit. Returns whether it warned.
    """
    if max_model_len is None:
        return False
    needed = -(-max_model_len // block_size)
    if num_slots >= needed:
        return False
    logger.warning(
        "kv_offload: the pool holds %d blocks but one prompt of max_model_len=%d tokens fills %d;"
        " only the leading %d blocks of such a prompt can be offloaded (raise cpu_bytes to keep it all)",
        num_slots, max_model_len, needed, num_slots,
    )  # fmt: skip
    return True


#: how often the scheduler re-reads the disk tier's index for other processes' blocks
_DISK_REFRESH_SECONDS = 2.0


class _Refresher:
    """Calls ``tier.refresh()`` every ``period`` seconds on a daemon thread, off the step."""

    def __init__(self, tier: BlockTier, period: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tier, period), name="kv_offload-disk-index", daemon=True)
        self._thread.start()

    def _run(self, tier: BlockTier, period: float) -> None:
        while not self._stop.wait(period):
            try:
                tier.refresh()
            except Exception:  # never take the scheduler down; the index just stays older
                logger.exception("kv_offload: refreshing the disk tier's index failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class KVOffloadConnector(KVConnectorBase_V1, SupportsHMA):  # type: ignore[misc]
    """Offloads KV blocks into a host pool and loads them back on prefix hits."""

    _cache_hit_source = HOST_HIT_SOURCE

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.config = OffloadConfig.from_dict(extra)
        self.geometry = compat.kv_geometry(kv_cache_config, compat.page_format())
        self.world_size = compat.world_size(vllm_config)
        self.scheduler_half: SchedulerHalf | None = None
        self.worker_half: WorkerHalf | None = None
        self._requests: dict[str, Any] = {}
        #: request -> its preemption count when vLLM last admitted it with an asynchronous
        #: load (see :meth:`get_num_new_matched_tokens`)
        self._async_admissions: dict[str, int] = {}
        #: request -> whether the hit its last match offered loads asynchronously
        self._offered_async: dict[str, bool] = {}
        #: everything reported since start (scheduler side), for tests and debugging
        self.totals = KVOffloadStats()
        if role == KVConnectorRole.SCHEDULER:
            manager = build_manager(self.config, self.geometry, self.world_size)
            block_size = self.geometry.block_size
            self.namespace = compat.namespace(vllm_config, self.geometry)
            self.disk_index: BlockTier | None = None
            if self.config.disk is not None:
                # The scheduler's view of rank 0's disk tier: an index it only reads, refreshed
                # in the background for blocks other processes wrote (it never writes).
                self.disk_index = open_disk_tier(
                    self.config.disk, self.geometry.slot_bytes, self.namespace.rank_digest(0), self.world_size,
                    label=namespace_label(self.namespace, 0, self.geometry),
                )  # fmt: skip
                self._refresher = _Refresher(self.disk_index, _DISK_REFRESH_SECONDS)
            self.remote_index: RemoteIndex | None = None
            self._remote_lookups: BlockTier | None = None
            self._refreshers: list[_Refresher] = []  # of the imports' disk indexes
            self._import_lookups: list[BlockTier] = []
            if self.config.remote is not None:
                # The scheduler's own connection, for lookups only (rank 0's keys), asked on
                # a thread of its own within the lookup budget: never on the step.
                self._remote_lookups = open_remote_tier(
                    self.config.remote, self.geometry.slot_bytes, self.namespace.rank_digest(0)
                )
                self.remote_index = RemoteIndex(self._remote_lookups, self.config.remote.lookup_budget_ms / 1000)
                logger.info(
                    "kv_offload: remote tier %s (key prefix %r, lookup budget %d ms, %s)",
                    self.config.remote.shown_url, self.config.remote.prefix, self.config.remote.lookup_budget_ms,
                    "read-write" if self.config.remote.write else "read-only",
                )  # fmt: skip
                if self.config.remote.url_has_password:
                    logger.warning(
                        "kv_offload: the remote store's URL carries a password, and vLLM prints its whole"
                        " kv-transfer-config at start-up: give it with remote.password_file or"
                        " remote.password_env instead"
                    )
            self._import_indexes = self._open_import_indexes()
            self.scheduler_half = SchedulerHalf(
                self.config, manager, block_size=block_size, world_size=self.world_size,
                namespace=self.namespace.digest, extra_keys=compat.block_extra_keys, disk=self.disk_index,
                remote=self.remote_index, remote_write=self.config.remote is None or self.config.remote.write,
                imports=[index for index, _ in self._import_indexes],
            )  # fmt: skip
            if self.config.recompute_on_load_failure and compat.use_recompute_policy(vllm_config):
                logger.info("kv_offload: kv_load_failure_policy set to 'recompute' (a failed load recomputes)")
            logger.info(
                "kv_offload: scheduler side ready: %d pool blocks of %d tokens (%d bytes per worker), vLLM %s;"
                " key namespace %s", manager.num_slots, block_size, self.geometry.block_bytes,
                compat.vllm_version(), self.namespace.to_json(),
            )  # fmt: skip
            warn_if_pool_below_one_prompt(manager.num_slots, block_size, compat.max_model_len(vllm_config))
        else:
            check_components(self.config, self.geometry, self.world_size)
            rank = compat.worker_rank()
            tiered = self.config.disk is not None or self.config.remote is not None
            own = compat.namespace(vllm_config, self.geometry) if tiered else None
            namespace = own.rank_digest(rank) if own is not None else None
            imports = [
                (src, producer_namespace(own, src).rank_digest(rank))
                for src in import_geometries(self.config, self.geometry) if own is not None
            ]  # fmt: skip
            self.worker_half = WorkerHalf(
                self.config, self.geometry, world_size=self.world_size, rank=rank, namespace=namespace,
                imports=imports, label=namespace_label(own, rank, self.geometry) if own is not None else None,
            )  # fmt: skip

    def _open_import_indexes(self) -> list[tuple[ImportIndex, BlockTier | RemoteIndex]]:
        """The scheduler's view of each ``imports`` entry in each lower tier: the producer's
        tier opened on its namespace (rank 0's keys, read only; the disk's index refreshed
        like our own), wrapped to answer by our keys (see :mod:`kv_offload.vllm.imports`)."""
        out: list[tuple[ImportIndex, BlockTier | RemoteIndex]] = []
        for i, src in enumerate(import_geometries(self.config, self.geometry)):
            theirs = producer_namespace(self.namespace, src)
            ratio = self.geometry.block_size // src.block_size
            if self.config.disk is not None:
                disk = open_disk_tier(self.config.disk, src.slot_bytes, theirs.rank_digest(0), self.world_size)
                self._refreshers.append(_Refresher(disk, _DISK_REFRESH_SECONDS))
                out.append((ImportIndex(import_tier_name("disk", i), disk, theirs.digest, src.block_size, ratio), disk))
            if self.config.remote is not None:
                lookups = open_remote_tier(self.config.remote, src.slot_bytes, theirs.rank_digest(0))
                remote = RemoteIndex(lookups, self.config.remote.lookup_budget_ms / 1000)
                self._import_lookups.append(lookups)
                name = import_tier_name("remote", i)
                out.append((ImportIndex(name, remote, theirs.digest, src.block_size, ratio), remote))
            logger.info(
                "kv_offload: importing blocks of %s pages, %s, %d tokens (%d per block of ours), key namespace %s",
                src.page_format.value, str(src.dtype).removeprefix("torch."), src.block_size, ratio, theirs.to_json(),
            )  # fmt: skip
        return out

    # -- vLLM properties and class hooks -------------------------------------------------
    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped store is only a future miss."""
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        # Parse early so a bad config fails before the model loads.
        OffloadConfig.from_dict(vllm_config.kv_transfer_config.kv_connector_extra_config)
        return None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVOffloadStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVOffloadPromMetrics:
        return KVOffloadPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side ------------------------------------------------------------------
    def _sched(self) -> SchedulerHalf:
        assert self.scheduler_half is not None, "scheduler hook called on a worker connector"
        return self.scheduler_half

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = request

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        req_id = request.request_id
        self._requests[req_id] = request
        tokens, load_async = self._sched().match(request, num_computed_tokens)
        admitted = self._async_admissions.get(req_id)
        if tokens and load_async and admitted is not None and admitted == getattr(request, "num_preemptions", 0):
            # vLLM admits this request again without a preemption in between: its earlier
            # asynchronous load failed and rolled it back to nothing computed. vLLM (0.32)
            # frees its blocks then but keeps it among its in-flight prefills, whose
            # reservations gate every asynchronous admission, its own included: admitted
            # with a load again, its own stale reservation makes the allocation fail, and
            # as vLLM stops scheduling waiting requests at the first that does not fit, the
            # engine stalls for good (found by benchmarks/soak.py). It recomputes instead.
            logger.debug("kv_offload: %s recomputes after a failed load (not loaded again)", req_id)
            tokens, load_async = 0, False
        self._offered_async[req_id] = load_async
        return tokens, load_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._requests[request.request_id] = request
        if num_external_tokens > 0 and self._offered_async.pop(request.request_id, False):
            self._async_admissions[request.request_id] = getattr(request, "num_preemptions", 0)
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self._sched().on_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVOffloadMetadata:
        sched = self._sched()
        scheduled = [
            ScheduledRequest(request, computed, new, block_ids)
            for request, computed, new, block_ids in compat.scheduled_requests(
                scheduler_output, self._requests, self._kv_cache_manager
            )
        ]
        plan = sched.build_plan(scheduled, compat.zeroed_blocks(scheduler_output))
        return KVOffloadMetadata(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(StepPlan)})

    def update_connector_output(self, connector_output: Any) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, TransferReport) and report.outcomes:
            self._sched().on_report(report)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Never delays the free: pending stores are fenced (see scheduler.py).
        self._requests.pop(request.request_id, None)
        self._async_admissions.pop(request.request_id, None)
        self._offered_async.pop(request.request_id, None)
        self._sched().on_finished(request)
        return False, None

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.scheduler_half is None:
            # The scheduler half reports the jobs of every worker; a worker adds only what
            # its own lower tiers saw (evictions, checksum failures, errors, reconnects, the
            # disk's size), rank 0 alone.
            worker = self.worker_half
            tier_data = worker.take_tier_stats() if worker is not None and worker.rank == 0 else None
            return KVOffloadStats(data=dict(tier_data)) if tier_data else None
        counters = self.scheduler_half.take_counters()
        if not counters.any() and (self.remote_index is None or not self.remote_index.has_latencies()):
            return None
        data: dict[str, Any] = counters.as_dict()
        data.pop("flushes", None)
        if self.remote_index is not None:
            latencies = self.remote_index.take_latencies()
            if latencies:
                data["remote_lookup_seconds"] = latencies
        data["pool_used_blocks"] = self.scheduler_half.manager.num_used
        data["pool_capacity_blocks"] = self.scheduler_half.manager.num_slots
        stats = KVOffloadStats(data=data)
        totals = self.totals.aggregate(stats)
        totals.data.pop("transfers", None)
        totals.data.pop("remote_lookup_seconds", None)
        self.totals = KVOffloadStats(data=totals.data)
        return stats

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping until every job is settled (stats and slots stay exact)."""
        return self.scheduler_half is not None and self.scheduler_half.num_pending_jobs > 0

    def reset_cache(self) -> bool | None:
        if self.scheduler_half is not None:
            self.scheduler_half.reset()
        return True

    # -- worker side ---------------------------------------------------------------------
    def _work(self) -> WorkerHalf:
        assert self.worker_half is not None, "worker hook called on the scheduler connector"
        return self.worker_half

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepPlan)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._work().register(compat.ordered_layers(self._kv_cache_config, kv_caches))

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        if isinstance(kv_connector_metadata, StepPlan) and self.worker_half is not None:
            self.worker_half.flush(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._work().start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-block and asynchronous; nothing waits per layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores are planned per block by the scheduler and submitted in wait_for_save

    def wait_for_save(self) -> None:
        self._work().submit_stores(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        worker = self._work()
        worker.poll()
        return None, worker.take_finished_recving() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().take_invalid_blocks()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._work().take_report()
        return None if report is None else KVOffloadWorkerMetadata(report.outcomes)

    def shutdown(self) -> None:
        if self.worker_half is not None:
            self.worker_half.shutdown()
        if self.scheduler_half is not None and self.disk_index is not None:
            self._refresher.stop()
            self.disk_index.close()
        if self.scheduler_half is not None:
            for refresher in self._refreshers:
                refresher.stop()
            for _, index in self._import_indexes:
                index.close()
            for lookups in self._import_lookups:
                lookups.close()
        if self.scheduler_half is not None and self.remote_index is not None:
            self.remote_index.close()
            assert self._remote_lookups is not None
            self._remote_lookups.close()
