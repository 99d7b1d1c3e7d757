# SPDX-License-Identifier: Apache-2.0
"""Connector statistics: vLLM's ``KVConnectorStats`` and the Prometheus metrics.

The scheduler half produces a :class:`KVOffloadStats` per engine step (counters are deltas,
gauges the latest value); vLLM ships its ``data`` dict to the front-end process, rebuilds it
with ``KVOffloadConnector.build_kv_connector_stats``, logs :meth:`KVOffloadStats.reduce`
and feeds :class:`KVOffloadPromMetrics`, which exports (names as they appear on ``/metrics``):

==========================================  =====================================================
``kv_offload:hit_tokens_total``             prompt tokens served from the pool
``kv_offload:loaded_bytes_total``           bytes copied pool -> KV cache
``kv_offload:stored_bytes_total``           bytes copied KV cache -> pool
``kv_offload:loaded_blocks_total``          blocks loaded
``kv_offload:stored_blocks_total``          blocks stored
``kv_offload:transfer_seconds_total``       copy time, label ``direction`` (load / store)
``kv_offload:failed_transfers_total``       failed jobs, label ``direction``
``kv_offload:evicted_blocks_total``         blocks evicted from the pool
``kv_offload:stores_skipped_total``         blocks not stored: no room (everything in use)
``kv_offload:invalidated_blocks_total``     blocks dropped from the pool after a failed load
``kv_offload:disk_hit_tokens_total``        prompt tokens served from the disk tier
``kv_offload:promoted_blocks_total``        blocks promoted disk -> pool -> KV cache
``kv_offload:failed_promotes_total``        promotions that failed (the request recomputed)
``kv_offload:written_back_blocks_total``    blocks written through to the disk tier
``kv_offload:import_hit_tokens_total``      prompt tokens served from another engine's blocks
                                            (``imports``), converted on load
``kv_offload:imported_blocks_total``        blocks imported (converted into this engine's pages)
``kv_offload:failed_imports_total``         imports that failed (the request recomputed)
``kv_offload:failed_writebacks_total``      write-backs that failed (the blocks stay DRAM-only)
``kv_offload:writebacks_skipped_total``     blocks not written through: the pool evicted them first
``kv_offload:transfer_throughput_gbps``     histogram of per-job GB/s, label ``direction``: load,
                                            store, promote (disk -> pool -> KV cache), writeback
``kv_offload:timed_out_jobs_total``         jobs failed at their deadline, label ``direction``
                                            (load, store, promote, writeback)
``kv_offload:pool_reading_blocks``          gauge: pool blocks protected for loads
``kv_offload:pool_writing_blocks``          gauge: pool blocks reserved for stores and promotions
``kv_offload:pending_jobs``                 gauge: transfer jobs not settled
``kv_offload:quarantined_slots``            gauge: pool slots held by timed-out jobs a worker
                                            may still write (freed by their late report)
``kv_offload:pool_used_blocks``             gauge: blocks held
``kv_offload:pool_capacity_blocks``         gauge: pool size in blocks
``kv_offload:pool_usage_ratio``             gauge: used / capacity
``kv_offload:tier_*{tier}``                 per tier (``dram``, ``disk``, ``remote``): hit tokens,
                                            read and written bytes, evicted and corrupt blocks,
                                            errors and reconnects (counters), used and capacity
                                            blocks, connected (gauges)
``kv_offload:tier_throughput_gbps``         histogram of per-job GB/s of a lower tier, labels
                                            ``tier`` and ``direction`` (promote, writeback)
``kv_offload:tier_lookup_seconds``          histogram of remote lookup latency, label ``tier``
==========================================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kv_offload.vllm.compat import KVConnectorPromMetrics, KVConnectorStats

__all__ = ["KVOffloadStats", "KVOffloadPromMetrics", "COUNTERS", "GAUGES"]

#: data key -> (metric name without ``_total``, help text)
COUNTERS: dict[str, tuple[str, str]] = {
    "hit_tokens": ("kv_offload:hit_tokens", "Prompt tokens served from the kv-offload pool."),
    "loaded_bytes": ("kv_offload:loaded_bytes", "Bytes copied from the pool into the KV cache."),
    "stored_bytes": ("kv_offload:stored_bytes", "Bytes copied from the KV cache into the pool."),
    "loaded_blocks": ("kv_offload:loaded_blocks", "KV blocks loaded from the pool."),
    "stored_blocks": ("kv_offload:stored_blocks", "KV blocks stored into the pool."),
    "evicted_blocks": ("kv_offload:evicted_blocks", "KV blocks evicted from the pool."),
    "stores_skipped": ("kv_offload:stores_skipped", "KV blocks not stored because the pool had no free room."),
    "invalidated_blocks": ("kv_offload:invalidated_blocks", "KV blocks dropped from the pool after a failed load."),
    "disk_hit_tokens": ("kv_offload:disk_hit_tokens", "Prompt tokens served from the disk tier (through the pool)."),
    "remote_hit_tokens": ("kv_offload:remote_hit_tokens", "Prompt tokens served from the remote tier (through the pool)."),
    "promoted_blocks": ("kv_offload:promoted_blocks", "KV blocks promoted from a lower tier into the KV cache."),
    "failed_promotes": ("kv_offload:failed_promotes", "Promotions from a lower tier that failed (recomputed)."),
    "written_back_blocks": ("kv_offload:written_back_blocks", "KV blocks written through to a lower tier."),
    "failed_writebacks": ("kv_offload:failed_writebacks", "Write-backs to a lower tier that failed."),
    "writebacks_skipped": (
        "kv_offload:writebacks_skipped", "KV blocks not written through to a lower tier: evicted from the pool first.",
    ),
    "import_hit_tokens": (
        "kv_offload:import_hit_tokens", "Prompt tokens served from another engine's blocks, converted on load.",
    ),
    "imported_blocks": ("kv_offload:imported_blocks", "KV blocks imported from another engine's page geometry."),
    "failed_imports": ("kv_offload:failed_imports", "Imports of another engine's blocks that failed (recomputed)."),
}
#: data key -> (metric name, help text); the latest value wins
GAUGES: dict[str, tuple[str, str]] = {
    "pool_used_blocks": ("kv_offload:pool_used_blocks", "KV blocks held by the pool."),
    "pool_capacity_blocks": ("kv_offload:pool_capacity_blocks", "Capacity of the pool in KV blocks."),
    "disk_used_blocks": ("kv_offload:disk_used_blocks", "KV blocks held by the disk tier (rank 0)."),
    "disk_capacity_blocks": ("kv_offload:disk_capacity_blocks", "Capacity of the disk tier in KV blocks (rank 0)."),
    "remote_connected": ("kv_offload:remote_connected", "1 while the remote store is connected (rank 0)."),
    "pool_reading_blocks": ("kv_offload:pool_reading_blocks", "Pool blocks protected for loads in flight."),
    "pool_writing_blocks": ("kv_offload:pool_writing_blocks", "Pool blocks reserved for stores and promotions in flight."),
    "pending_jobs": ("kv_offload:pending_jobs", "Transfer jobs not settled yet."),
    "quarantined_slots": (
        "kv_offload:quarantined_slots", "Pool slots held by timed-out jobs a worker may still write.",
    ),
}
#: data key -> ``direction`` label of ``kv_offload:timed_out_jobs``
TIMED_OUT = {"timed_out_loads": "load", "timed_out_stores": "store", "timed_out_promotes": "promote",
             "timed_out_writebacks": "writeback"}  # fmt: skip
#: Per-tier families (label ``tier``): metric -> (help, {tier: how to read it from ``data``}).
#: A reader is a data key, or a tuple (key, minus keys...) for a difference.
TIERED: dict[str, tuple[str, dict[str, str | tuple[str, ...]]]] = {
    "kv_offload:tier_hit_tokens": (
        "Prompt tokens served by kv-offload, by the tier they came from.",
        {"dram": ("hit_tokens", "disk_hit_tokens", "remote_hit_tokens"), "disk": "disk_hit_tokens",
         "remote": "remote_hit_tokens"},
    ),
    "kv_offload:tier_read_bytes": (
        "Bytes read from a tier (DRAM: into the KV cache; disk, remote: into the pool).",
        {"dram": "loaded_bytes", "disk": "disk_read_bytes", "remote": "remote_read_bytes"},
    ),
    "kv_offload:tier_written_bytes": (
        "Bytes written to a tier (DRAM: stores; disk, remote: write-backs).",
        {"dram": "stored_bytes", "disk": "disk_written_bytes", "remote": "remote_written_bytes"},
    ),
    "kv_offload:tier_evicted_blocks": ("KV blocks evicted from a tier.", {"dram": "evicted_blocks", "disk": "disk_evicted_blocks"}),
    "kv_offload:tier_corrupt_blocks": (
        "KV blocks that failed their checksum or header check on a tier (each a miss, never loaded).",
        {"disk": "disk_corrupt_blocks", "remote": "remote_corrupt_blocks"},
    ),
    "kv_offload:tier_failed_promotes": (
        "Promotions from a tier that failed (the request recomputed).",
        {"disk": ("failed_promotes", "remote_failed_promotes"), "remote": "remote_failed_promotes"},
    ),
    "kv_offload:tier_failed_writebacks": (
        "Write-backs to a tier that failed (the blocks were not stored there).",
        {"disk": ("failed_writebacks", "remote_failed_writebacks"), "remote": "remote_failed_writebacks"},
    ),
    "kv_offload:tier_errors": (
        "Operations on a tier that failed because it was unreachable or too slow.", {"remote": "remote_errors"},
    ),
    "kv_offload:tier_reconnects": ("Times a tier's connection came back after a failure.", {"remote": "remote_reconnects"}),
}
#: Per-tier gauges (label ``tier``): metric -> (help, {tier: data key}).
TIERED_GAUGES: dict[str, tuple[str, dict[str, str]]] = {
    "kv_offload:tier_used_blocks": ("KV blocks held by a tier.", {"dram": "pool_used_blocks", "disk": "disk_used_blocks"}),
    "kv_offload:tier_capacity_blocks": (
        "Capacity of a tier in KV blocks.", {"dram": "pool_capacity_blocks", "disk": "disk_capacity_blocks"},
    ),
    "kv_offload:tier_connected": ("1 while a tier's store is connected.", {"remote": "remote_connected"}),
}
#: transfer path -> (tier, direction) of the per-tier throughput histogram
_TIER_PATHS = {
    "promote": ("disk", "promote"), "writeback": ("disk", "writeback"),
    "remote_promote": ("remote", "promote"), "remote_writeback": ("remote", "writeback"),
}  # fmt: skip
_LOOKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_DIRECTED = ("load_seconds", "store_seconds", "failed_loads", "failed_stores")
_GBPS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass
class KVOffloadStats(KVConnectorStats):
    """Counters since the last report, the pool gauges, and per-job transfers.

    ``data`` holds the keys of :data:`COUNTERS` and :data:`GAUGES`, ``load_seconds``,
    ``store_seconds``, ``failed_loads``, ``failed_stores``, and ``transfers`` (a list of
    ``[direction, bytes, seconds]``).
    """

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = dict(self.data)
        for key, value in other.data.items():
            if key in GAUGES:
                merged[key] = value
            elif key in ("transfers", "remote_lookup_seconds"):
                merged[key] = list(merged.get(key, [])) + list(value)
            else:
                merged[key] = merged.get(key, 0) + value
        return KVOffloadStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in ("hit_tokens", "loaded_bytes", "stored_bytes")}
        for key, direction in (("load_seconds", "loaded_bytes"), ("store_seconds", "stored_bytes")):
            seconds = float(d.get(key, 0.0))
            out[f"{key.split('_')[0]}_gbps"] = round(d.get(direction, 0) / seconds / 1e9, 3) if seconds else 0.0
        out["failed_transfers"] = d.get("failed_loads", 0) + d.get("failed_stores", 0)
        out["evicted_blocks"] = d.get("evicted_blocks", 0)
        out["timed_out_jobs"] = sum(d.get(key, 0) for key in TIMED_OUT)
        if d.get("pool_capacity_blocks"):
            out["pool_usage"] = round(d.get("pool_used_blocks", 0) / d["pool_capacity_blocks"], 4)
        return out

    def is_empty(self) -> bool:
        """Whether there is nothing to report. vLLM drops a scheduler-side stats object that
        says so, and the scheduler half builds one only when a counter or an in-flight gauge
        moved (:meth:`OffloadCounters.any`): so one carrying gauges is never empty, even with
        every counter 0. (It was, by its counters alone: a step whose only news was
        ``pending_jobs`` falling to 0 was dropped, and the gauge read 2 for good after the
        load; found by the soak in CI.)"""
        return not self.data


class KVOffloadPromMetrics(KVConnectorPromMetrics):
    """Prometheus counters, gauges and a throughput histogram, one child per engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter: Any = self._counter_cls
        gauge: Any = self._gauge_cls
        histogram: Any = self._histogram_cls
        self._counters = {
            key: counter(name=name, documentation=doc, labelnames=labelnames)
            for key, (name, doc) in COUNTERS.items()
        }
        self._gauges = {
            key: gauge(name=name, documentation=doc, labelnames=labelnames, multiprocess_mode="mostrecent")
            for key, (name, doc) in GAUGES.items()
        }
        self._usage = gauge(
            name="kv_offload:pool_usage_ratio", documentation="Fraction of the pool in use.",
            labelnames=labelnames, multiprocess_mode="mostrecent",
        )  # fmt: skip
        directed = [*labelnames, "direction"]
        self._seconds = counter(
            name="kv_offload:transfer_seconds", documentation="Seconds spent copying, by direction.",
            labelnames=directed,
        )  # fmt: skip
        self._failed = counter(
            name="kv_offload:failed_transfers", documentation="Failed transfer jobs, by direction.",
            labelnames=directed,
        )  # fmt: skip
        self._timed_out = counter(
            name="kv_offload:timed_out_jobs", documentation="Transfer jobs failed at their deadline, by direction.",
            labelnames=directed,
        )  # fmt: skip
        self._gbps = histogram(
            name="kv_offload:transfer_throughput_gbps", documentation="Throughput of each transfer job, GB/s.",
            labelnames=directed, buckets=_GBPS_BUCKETS,
        )  # fmt: skip
        tiered = [*labelnames, "tier"]
        self._tier_gbps = histogram(
            name="kv_offload:tier_throughput_gbps", documentation="Throughput of each lower-tier job, GB/s.",
            labelnames=[*tiered, "direction"], buckets=_GBPS_BUCKETS,
        )  # fmt: skip
        self._lookup = histogram(
            name="kv_offload:tier_lookup_seconds", documentation="Latency of a batched remote lookup, seconds.",
            labelnames=tiered, buckets=_LOOKUP_BUCKETS,
        )  # fmt: skip
        self._tiered = {
            name: counter(name=name, documentation=doc, labelnames=tiered) for name, (doc, _) in TIERED.items()
        }
        self._tiered_gauges = {
            name: gauge(name=name, documentation=doc, labelnames=tiered, multiprocess_mode="mostrecent")
            for name, (doc, _) in TIERED_GAUGES.items()
        }
        for labels in per_engine_labelvalues.values():  # export zeros from the start
            for counter in self._counters.values():
                counter.labels(*labels)
            for name, (_, tiers) in TIERED.items():
                for tier in tiers:
                    self._tiered[name].labels(*labels, tier)
            for direction in ("load", "store"):
                self._seconds.labels(*labels, direction)
                self._failed.labels(*labels, direction)
            for direction in TIMED_OUT.values():
                self._timed_out.labels(*labels, direction)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        d = transfer_stats_data
        for key, counter in self._counters.items():
            if d.get(key):
                counter.labels(*labels).inc(d[key])
        for key, gauge in self._gauges.items():
            if key in d:
                gauge.labels(*labels).set(d[key])
        if d.get("pool_capacity_blocks"):
            self._usage.labels(*labels).set(d.get("pool_used_blocks", 0) / d["pool_capacity_blocks"])
        for name, (_, tiers) in TIERED.items():
            for tier, reader in tiers.items():
                if isinstance(reader, str):
                    value = d.get(reader, 0)
                else:
                    value = d.get(reader[0], 0) - sum(d.get(k, 0) for k in reader[1:])
                if value > 0:
                    self._tiered[name].labels(*labels, tier).inc(value)
        for name, (_, gauge_tiers) in TIERED_GAUGES.items():
            for tier, key in gauge_tiers.items():
                if key in d:
                    self._tiered_gauges[name].labels(*labels, tier).set(d[key])
        for direction in ("load", "store"):
            seconds = d.get(f"{direction}_seconds", 0.0)
            if seconds:
                self._seconds.labels(*labels, direction).inc(seconds)
            failed = d.get(f"failed_{direction}s", 0)
            if failed:
                self._failed.labels(*labels, direction).inc(failed)
        for key, direction in TIMED_OUT.items():
            if d.get(key):
                self._timed_out.labels(*labels, direction).inc(d[key])
        for direction, nbytes, seconds in d.get("transfers", ()):
            if seconds > 0:
                self._gbps.labels(*labels, direction).observe(nbytes / seconds / 1e9)
                if direction in _TIER_PATHS:
                    self._tier_gbps.labels(*labels, *_TIER_PATHS[direction]).observe(nbytes / seconds / 1e9)
        for seconds in d.get("remote_lookup_seconds", ()):
            self._lookup.labels(*labels, "remote").observe(seconds)
