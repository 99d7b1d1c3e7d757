# SPDX-License-Identifier: Apache-2.0
"""Fault handling of the connector's halves without vLLM (issue 14, faults): jobs that hang
(the worker's deadline, the scheduler's backstop for a job no worker reports), exceptions
inside the transfer threads, and a full disk under the disk tier (a real size-limited tmpfs).

Hangs are injected inside the real threads (``ThreadFaults`` on the CPU engine's copy thread
and the tier I/O thread) and released by the test, so nothing here waits on a wall clock
beyond the tiny deadlines the configs set; loops are bounded by a generous guard.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kv_offload.config import OffloadConfig
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.testing.faults import ThreadFaults
from kv_offload.vllm.metadata import JobOutcome, TransferReport
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.stats import GAUGES, KVOffloadStats
from kv_offload.vllm.worker import WorkerHalf, open_disk_tier

from disk_tier_helpers import fill
from disk_tier_helpers import small_fs as disk_small_fs
from halves_helpers import BS, GEOM, FakeRequest
from halves_helpers import make_half as _half
from halves_helpers import make_layers as _layers
from halves_helpers import ok_report as _ok
from halves_helpers import prefill as _prefill
from halves_helpers import run_until_settled as _run_until_settled
from halves_helpers import step as _step

GUARD_S = 20.0  # a stall fails the test instead of hanging it (never an expected duration)


def _poll_until(worker: WorkerHalf, done: "object") -> None:
    deadline = time.monotonic() + GUARD_S
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        worker.poll()
        time.sleep(0.002)
    assert done(), "stalled"  # type: ignore[operator]


def _halves(timeout: float = 0.05, **cfg: object) -> tuple[SchedulerHalf, WorkerHalf, list[torch.Tensor]]:
    config = OffloadConfig.from_dict({"cpu_bytes": 8 * GEOM.slot_bytes, "sync_load_max_bytes": 0,
                                      "job_timeout_s": timeout, **cfg})  # fmt: skip
    half = SchedulerHalf(config, OffloadManager(8, LRUPolicy(8)), block_size=BS)
    worker = WorkerHalf(config, GEOM)
    layers = _layers()
    worker.register(layers)
    return half, worker, layers


def _stored(half: SchedulerHalf, worker: WorkerHalf, prompt: list[int], blocks: list[int]) -> None:
    req = FakeRequest("writer", prompt)
    half.on_alloc(req, blocks, 0)
    _step(half, worker, [ScheduledRequest(req, 0, len(prompt), blocks)])
    half.on_finished(req)
    _run_until_settled(half, worker)


def _report(worker: WorkerHalf) -> list[JobOutcome]:
    report = worker.take_report()
    return report.outcomes if report else []


# -- the worker's deadline -------------------------------------------------------------------------
def test_a_hung_load_times_out_recomputes_and_never_lands_late() -> None:
    half, worker, layers = _halves()
    _stored(half, worker, list(range(3 * BS)), [1, 2, 3])
    hang = ThreadFaults(hang_every=1)  # every copy stalls until released
    worker.engine.fault_hook = hang  # type: ignore[union-attr]
    req = FakeRequest("r", list(range(3 * BS)) + [5])
    assert half.match(req, 0) == (3 * BS, True)
    half.on_alloc(req, [4, 5, 6, 7], 3 * BS)
    plan = _step(half, worker, [])
    (load,) = plan.loads
    for t in layers:
        t[[4, 5, 6]] = 7.0  # what vLLM puts there next, once the request recomputes
    _poll_until(worker, lambda: "r" in worker._finished_recving)
    assert worker.take_finished_recving() == {"r"}
    assert worker.take_invalid_blocks() == {4, 5, 6}  # vLLM recomputes them
    assert all(torch.count_nonzero(t[[4, 5, 6]]) == 0 for t in layers)  # zeroed, never garbage
    (outcome,) = _report(worker)
    assert (outcome.job_id, outcome.success, outcome.timed_out) == (load.job_id, False, True)
    half.on_report(TransferReport([outcome]))
    counters = half.take_counters()
    assert counters.timed_out_loads == 1 and counters.failed_loads == 1
    half.check_settled()
    # The copy thread comes back: the cancelled copy must not land in the reused blocks.
    for t in layers:
        t[[4, 5, 6]] = 3.0
    hang.release()
    worker.engine.wait([load.job_id])  # type: ignore[union-attr]
    worker.poll()
    assert all(bool((t[[4, 5, 6]] == 3.0).all()) for t in layers)
    assert _report(worker) == [] and worker.take_invalid_blocks() == set()
    assert worker.timed_out["load"] == 1
    worker.shutdown()


def test_a_hung_store_does_not_hold_the_step_and_writes_nothing() -> None:
    half, worker, layers = _halves()
    hang = ThreadFaults(hang_every=1)
    worker.engine.fault_hook = hang  # type: ignore[union-attr]
    a = FakeRequest("a", list(range(2 * BS)))
    store = _prefill(half, a, [1, 2]).stores[0]
    worker.submit_stores(_step(half, worker, []))  # nothing: the store was planned above
    worker.start_loads(half.build_plan([]))
    from kv_offload.vllm.metadata import StepPlan

    worker.submit_stores(StepPlan(stores=(store,)))
    pool_before = worker.backend.open().clone()
    half.on_finished(a)
    b = FakeRequest("b", [9] * 100)
    plan = half.build_plan([ScheduledRequest(b, 0, 100, [2])])  # block 2 is written next
    assert plan.flush == (store.job_id,)
    flushed = threading.Thread(target=worker.flush, args=(plan,), daemon=True)
    flushed.start()
    flushed.join(GUARD_S)
    assert not flushed.is_alive(), "flush waited for a hung store past its deadline"
    worker.poll()
    (outcome,) = [o for o in _report(worker) if o.job_id == store.job_id]
    assert not outcome.success and outcome.timed_out
    half.on_report(TransferReport([outcome]))
    assert half.take_counters().timed_out_stores == 1
    half.check_settled()  # the slots were freed: the store was cancelled before reading
    hang.release()
    worker.engine.wait([store.job_id])  # type: ignore[union-attr]
    assert torch.equal(worker.backend.open(), pool_before), "a cancelled store wrote the pool"
    worker.shutdown()


def test_exceptions_inside_the_copy_thread_fail_their_jobs_and_the_thread_lives() -> None:
    half, worker, layers = _halves(timeout=60.0)
    faults = ThreadFaults(raise_every=1)
    worker.engine.fault_hook = faults  # type: ignore[union-attr]
    a = FakeRequest("a", list(range(3 * BS)))
    plan = _prefill(half, a, [1, 2, 3])
    worker.submit_stores(plan)
    half.on_finished(a)
    _poll_until(worker, lambda: bool(worker._outcomes))
    (outcome,) = _report(worker)
    assert not outcome.success and not outcome.timed_out
    half.on_report(TransferReport([outcome]))
    assert half.take_counters().failed_stores == 1 and faults.raised == 1
    half.check_settled()
    worker.engine.fault_hook = None  # the same thread runs the next job
    _stored(half, worker, list(range(3 * BS)), [1, 2, 3])
    assert half.take_counters().stored_blocks == 3
    worker.shutdown()


# -- the scheduler's backstop ----------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_jobs_no_worker_reports_are_timed_out_quarantined_and_freed_by_a_late_report() -> None:
    clock = _Clock()
    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0, "job_timeout_s": 1.0})
    half = SchedulerHalf(config, OffloadManager(16, LRUPolicy(16)), block_size=BS, clock=clock)
    first = FakeRequest("a", list(range(2 * BS + 5)))
    half.on_report(_ok(_prefill(half, first, [1, 2, 3])))
    b = FakeRequest("b", list(range(2 * BS + 5)))
    assert half.match(b, 0) == (2 * BS, True)
    half.on_alloc(b, [7, 8, 9], 2 * BS)
    c = FakeRequest("c", [4] * (2 * BS))
    half.on_alloc(c, [4, 5], 0)
    plan = half.build_plan([ScheduledRequest(c, 0, 2 * BS, [4, 5])])
    (load,), (store,) = plan.loads, plan.stores
    assert half.num_pending_jobs == 2
    clock.now += half.backstop_s - 0.01
    half.build_plan([])
    assert half.num_pending_jobs == 2  # not yet
    clock.now += 0.02
    plan = half.build_plan([ScheduledRequest(FakeRequest("d", [1] * 10), 0, 10, [5])])
    assert plan.flush == ()  # the fence is lifted: a late report can only fail that store
    assert half.num_pending_jobs == 0  # vLLM is not kept stepping for a job nobody reports
    counters = half.take_counters()
    assert (counters.timed_out_loads, counters.timed_out_stores) == (1, 1)
    # Quarantined: a worker may still read the load's slots and write the store's.
    assert counters.quarantined_slots == 4 and half.num_quarantined_slots == 4
    assert counters.pool_reading_blocks == 2 and counters.pool_writing_blocks == 2
    assert counters.gauges_changed and counters.any()
    with pytest.raises(AssertionError, match="timed-out jobs"):
        half.check_settled()
    # The late reports (even successful ones) settle them as failures: nothing is trusted.
    half.on_report(TransferReport([JobOutcome(store.job_id, True, 1, 0.1, False),
                                   JobOutcome(load.job_id, True, 1, 0.1, True)]))  # fmt: skip
    counters = half.take_counters()
    assert (counters.failed_stores, counters.failed_loads, counters.stored_blocks) == (1, 1, 0)
    assert counters.quarantined_slots == 0 and counters.pending_jobs == 0
    assert counters.timed_out_loads == 0  # counted once, when it timed out
    half.check_settled()
    assert not half.manager.holds(half.block_keys(c, 2)[0])  # the store never became readable
    # A duplicate of a settled job's report is ignored; a job never planned is still an error.
    half.on_report(TransferReport([JobOutcome(store.job_id, True, 1, 0.1, False)]))
    with pytest.raises(RuntimeError, match="unknown job"):
        half.on_report(TransferReport([JobOutcome(10**6, True, 1, 0.1, False)]))


def test_a_worker_timeout_is_counted_once_per_job_with_several_ranks() -> None:
    half = _half(world_size=2)
    plan = _prefill(half, FakeRequest("a", list(range(2 * BS))), [1, 2])
    (store,) = plan.stores
    half.on_report(TransferReport([JobOutcome(store.job_id, False, 0, 1.0, False, timed_out=True)]))
    half.on_report(TransferReport([JobOutcome(store.job_id, False, 0, 1.0, False, timed_out=True)]))
    counters = half.take_counters()
    assert counters.timed_out_stores == 1 and counters.failed_stores == 1
    half.check_settled()


def test_the_soak_gauges_are_exported_under_their_names() -> None:
    names = {GAUGES[k][0] for k in ("pool_reading_blocks", "pool_writing_blocks", "pending_jobs", "quarantined_slots")}
    assert names == {"kv_offload:pool_reading_blocks", "kv_offload:pool_writing_blocks", "kv_offload:pending_jobs",
                     "kv_offload:quarantined_slots"}  # fmt: skip
    half = _half()
    plan = _prefill(half, FakeRequest("a", list(range(2 * BS))), [1, 2])
    data = half.take_counters().as_dict()
    assert (data["pool_writing_blocks"], data["pending_jobs"]) == (2, 1)
    half.on_report(_ok(plan))
    later = KVOffloadStats(data=data).aggregate(KVOffloadStats(data=half.take_counters().as_dict()))
    assert (later.data["pool_writing_blocks"], later.data["pending_jobs"]) == (0, 0)  # latest wins
    assert not half.take_counters().any()  # nothing moved since



def test_a_step_whose_only_news_is_a_gauge_reaches_the_metrics() -> None:
    """vLLM drops a scheduler-side stats object whose ``is_empty()`` is true, and the
    scheduler half sends a gauge's new value once. A step that moves gauges and no counter
    (here: a store planned; in a CI soak: write-backs found done already, ``pending_jobs``
    2 -> 0) must not call itself empty, or the gauge keeps its old value for good."""
    half = _half()
    plan = _prefill(half, FakeRequest("a", list(range(2 * BS))), [1, 2])
    counters = half.take_counters()
    moved = {k: v for k, v in counters.as_dict().items() if v and k not in GAUGES}
    assert counters.any() and moved == {}, moved  # only the in-flight gauges moved
    assert (counters.pending_jobs, counters.pool_writing_blocks) == (1, 2)
    assert not KVOffloadStats(data=counters.as_dict()).is_empty()
    half.on_report(_ok(plan))
    assert not KVOffloadStats(data=half.take_counters().as_dict()).is_empty()
    assert not half.take_counters().any()  # nothing moved: the connector sends no stats

# -- tiers: a blocked read keeps its slots; exceptions in the tier thread ---------------------------
def _disk_halves(path: str, **cfg: object) -> tuple[SchedulerHalf, WorkerHalf, object, list[torch.Tensor]]:
    # 4 MiB of disk: one segment, which fits the 12 MiB file system once the ballast is gone
    config = OffloadConfig.from_dict({"cpu_bytes": 8 * GEOM.slot_bytes, "disk": {"path": path, "bytes": "4MiB"},
                                      "sync_load_max_bytes": 0, **cfg})  # fmt: skip
    index = open_disk_tier(config.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(config, OffloadManager(8, LRUPolicy(8)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(config, GEOM, namespace=b"n" * 16)
    layers = _layers()
    worker.register(layers)
    return half, worker, index, layers


def test_a_promotion_blocked_in_the_tier_releases_its_request_but_keeps_its_slots(tmp_path: Path) -> None:
    half, worker, index, layers = _disk_halves(str(tmp_path), job_timeout_s=0.05)
    _stored(half, worker, list(range(3 * BS)), [1, 2, 3])  # written through to disk
    assert half.take_counters().written_back_blocks == 3
    half.reset()  # the pool forgets them: the next hit comes from disk
    hang = ThreadFaults(hang_every=1)
    worker._tier_io["disk"].fault_hook = hang
    req = FakeRequest("r", list(range(3 * BS)) + [5])
    assert half.match(req, 0) == (3 * BS, True)
    half.on_alloc(req, [4, 5, 6, 7], 3 * BS)
    plan = _step(half, worker, [])
    (promo,) = plan.promotes
    _poll_until(worker, lambda: "r" in worker._finished_recving)
    assert worker.take_invalid_blocks() == {4, 5, 6}
    # The read is blocked in the tier and may still write the reserved slots: not reported.
    assert _report(worker) == [] and half.manager.num_writing == 3
    hang.release()
    _poll_until(worker, lambda: bool(worker._outcomes))
    (outcome,) = _report(worker)
    assert (outcome.job_id, outcome.success, outcome.timed_out) == (promo.job_id, False, True)
    assert all(torch.count_nonzero(t[[4, 5, 6]]) == 0 for t in layers)  # no copy after the read
    half.on_report(TransferReport([outcome]))
    counters = half.take_counters()
    assert counters.timed_out_promotes == 1 and counters.failed_promotes == 1
    half.check_settled()
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]


def test_an_exception_in_the_tier_thread_fails_that_write_back_only(tmp_path: Path) -> None:
    half, worker, index, _ = _disk_halves(str(tmp_path))
    faults = ThreadFaults(raise_every=2)  # the 2nd tier job raises
    worker._tier_io["disk"].fault_hook = faults
    for i in range(3):
        _stored(half, worker, [100 * i + j for j in range(2 * BS)], [1, 2])
    counters = half.take_counters()
    assert faults.raised == 1 and counters.failed_writebacks == 1
    assert counters.written_back_blocks == 4  # the thread went on with the next jobs
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]


# -- a full disk (a real size-limited tmpfs) -------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs of its own (or a skip saying why none can be mounted here)."""
    yield from disk_small_fs(tmp_path, "12m")


def test_a_full_disk_fails_write_backs_once_warned_and_recovers(small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    tier_dir = small_fs / "tier"
    half, worker, index, layers = _disk_halves(str(tier_dir))
    fill(small_fs / "ballast")
    caplog.set_level(logging.WARNING, logger="kv_offload.tiers.disk")
    for i in range(3):
        _stored(half, worker, [100 * i + j for j in range(2 * BS)], [1, 2])
    counters = half.take_counters()
    assert counters.failed_writebacks == 3 and counters.written_back_blocks == 0 and counters.stored_blocks == 6
    warnings = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(warnings) == 1 and "ENOSPC" in warnings[0].getMessage()
    assert worker.tiers["disk"].stats().blocks == 0  # nothing partial was indexed
    assert not any(half.disk.contains(half.block_keys(FakeRequest("x", list(range(2 * BS))), 2)))  # type: ignore[union-attr]
    # Space comes back: the next write-backs land, and are read back byte for byte.
    os.unlink(small_fs / "ballast")
    prompt = [7000 + j for j in range(2 * BS)]
    _stored(half, worker, prompt, [1, 2])
    expected = [t[[1, 2]].clone() for t in layers]
    assert half.take_counters().written_back_blocks == 2
    half.reset()
    req = FakeRequest("r", prompt + [1])
    assert half.match(req, 0) == (2 * BS, True)
    half.on_alloc(req, [5, 6, 0], 2 * BS)
    _step(half, worker, [])
    _run_until_settled(half, worker)
    assert worker.take_invalid_blocks() == set()
    assert all(torch.equal(t[[5, 6]], e) for t, e in zip(layers, expected))
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]
