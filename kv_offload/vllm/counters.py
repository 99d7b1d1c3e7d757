# SPDX-License-Identifier: Apache-2.0
"""What the scheduler half counts between two reports (vLLM's connector stats carry them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["GAUGE_FIELDS", "OffloadCounters"]


@dataclass
class OffloadCounters:
    """Deltas since the last :meth:`SchedulerHalf.take_counters` (blocks unless named)."""

    hit_tokens: int = 0
    loaded_blocks: int = 0
    stored_blocks: int = 0
    loaded_bytes: int = 0
    stored_bytes: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    load_jobs: int = 0
    store_jobs: int = 0
    failed_loads: int = 0
    failed_stores: int = 0
    stores_skipped: int = 0
    evicted_blocks: int = 0
    #: blocks dropped from the pool because a load of them failed
    invalidated_blocks: int = 0
    #: prompt tokens served from the disk / remote tier (also in ``hit_tokens``)
    disk_hit_tokens: int = 0
    remote_hit_tokens: int = 0
    #: prompt tokens served from another engine's blocks, converted on load (also in
    #: ``hit_tokens`` and their tier's); blocks so imported; imports that failed (recomputed)
    import_hit_tokens: int = 0
    imported_blocks: int = 0
    failed_imports: int = 0
    #: blocks promoted from a lower tier -> pool -> KV cache; promotions that failed (recomputed)
    promoted_blocks: int = 0
    failed_promotes: int = 0
    #: blocks written through to a lower tier; write-backs that failed (blocks skipped)
    written_back_blocks: int = 0
    failed_writebacks: int = 0
    #: blocks whose write-through never started: the pool evicted them first
    writebacks_skipped: int = 0
    #: bytes read from the disk / remote tier into the pool, and written to it
    disk_read_bytes: int = 0
    disk_written_bytes: int = 0
    remote_read_bytes: int = 0
    remote_written_bytes: int = 0
    #: the remote tier only: promotions and write-backs that failed
    remote_failed_promotes: int = 0
    remote_failed_writebacks: int = 0
    flushes: int = 0
    #: jobs failed at their deadline (by a worker at ``job_timeout_s``, or by the scheduler's
    #: backstop when no worker reported them), by kind
    timed_out_loads: int = 0
    timed_out_stores: int = 0
    timed_out_promotes: int = 0
    timed_out_writebacks: int = 0
    #: per finished job: (direction, bytes, seconds), for throughput histograms
    transfers: list[tuple[str, int, float]] = field(default_factory=list)
    #: gauges (values now, not deltas): pool blocks protected for loads, reserved for stores
    #: (and promotions), jobs not settled, slots held by jobs the backstop timed out
    pool_reading_blocks: int = 0
    pool_writing_blocks: int = 0
    pending_jobs: int = 0
    quarantined_slots: int = 0
    #: whether a gauge moved since the counters were last taken (not exported)
    gauges_changed: bool = False

    def any(self) -> bool:
        """Whether anything is worth reporting: a counter, or a gauge that moved."""
        return self.gauges_changed or any(v for k, v in self.__dict__.items() if k not in GAUGE_FIELDS)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        del out["gauges_changed"]
        return out


#: the fields of :class:`OffloadCounters` that are gauges
GAUGE_FIELDS = frozenset({"pool_reading_blocks", "pool_writing_blocks", "pending_jobs", "quarantined_slots",
                          "gauges_changed"})  # fmt: skip
