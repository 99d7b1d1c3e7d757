# SPDX-License-Identifier: Apache-2.0
"""The connector's two halves without vLLM: planning, fences, settling, and real copies."""

from __future__ import annotations

import time

import pytest
import torch

from kv_offload.config import OffloadConfig
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.vllm.metadata import StepPlan
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf

from halves_helpers import BS, GEOM, FakeRequest
from halves_helpers import make_half as _half
from halves_helpers import make_layers as _layers
from halves_helpers import ok_report as _ok
from halves_helpers import prefill as _prefill
from halves_helpers import settle as _settle


def test_full_prompt_blocks_are_stored_once_and_settle() -> None:
    half = _half()
    req = FakeRequest("a", list(range(300)))
    plan = _prefill(half, req, [4, 5, 6])
    assert len(plan.stores) == 1 and plan.stores[0].device_blocks == (4, 5)  # the partial block stays
    assert not plan.loads and not plan.flush
    assert half.manager.num_writing == 2
    # Decode steps add no prompt blocks: nothing new to store.
    again = half.build_plan([ScheduledRequest(req, 300, 1, [4, 5, 6])])
    assert not again.stores
    half.on_report(_ok(plan))
    half.check_settled()
    assert half.manager.num_used == 2
    assert half.take_counters().stored_blocks == 2


def test_pool_hit_is_loaded_asynchronously_leaving_one_token_to_compute() -> None:
    half = _half()
    first = FakeRequest("a", list(range(256)))
    half.on_report(_ok(_prefill(half, first, [1, 2])))
    second = FakeRequest("b", list(range(256)))  # same prompt: 2 full blocks in the pool
    assert half.match(second, 0) == (128, True)  # the last block holds the token to compute
    half.on_alloc(second, [7, 8], 128)
    plan = half.build_plan([])
    (load,) = plan.loads
    assert load.device_blocks == (7,) and load.req_id == "b"
    assert half.manager.num_reading == 1
    half.on_report(_ok(plan))
    half.check_settled()
    assert half.take_counters().hit_tokens == 128
    third = FakeRequest("c", list(range(256)) + [1] * 10)
    assert half.match(third, 128) == (128, True)  # after vLLM's own one-block hit
    assert half.match(FakeRequest("d", [9] * 300), 0) == (0, False)


def test_min_load_tokens_skips_short_hits() -> None:
    half = _half(min_load_tokens=256)
    half.on_report(_ok(_prefill(half, FakeRequest("a", list(range(300))), [1, 2, 3])))
    assert half.match(FakeRequest("b", list(range(200))), 0) == (0, False)
    assert half.match(FakeRequest("c", list(range(300))), 0) == (256, True)


def test_pending_store_fences_a_block_written_again() -> None:
    half = _half()
    a = FakeRequest("a", list(range(300)))
    store = _prefill(half, a, [4, 5, 6]).stores[0]
    half.on_finished(a)  # vLLM frees blocks 4, 5, 6 at once; the store still reads 4 and 5
    b = FakeRequest("b", [7] * 200)
    plan = half.build_plan([ScheduledRequest(b, 0, 200, [5, 9])])  # block 5 reused
    assert plan.flush == (store.job_id,)
    # Zeroed fresh blocks and load destinations are writes too.
    assert half.build_plan([], zeroed_blocks=[4]).flush == (store.job_id,)
    assert half.build_plan([ScheduledRequest(b, 200, 1, [5, 9])]).flush == ()  # block 9 only
    half.on_report(_ok(StepPlan(stores=(store,))))
    assert half.build_plan([], zeroed_blocks=[4]).flush == ()
    (b_store,) = [job for job in plan.stores]  # b's own first block (5) is full: it is stored too
    assert half.build_plan([], zeroed_blocks=[5]).flush == (b_store.job_id,)
    half.on_report(_ok(StepPlan(stores=(b_store,))))
    half.check_settled()


def test_failed_jobs_free_slots_and_count() -> None:
    half = _half()
    plan = _prefill(half, FakeRequest("a", list(range(256))), [1, 2])
    half.on_report(_ok(plan, success=False))
    half.check_settled()
    assert half.manager.num_used == 0
    half.on_report(_ok(_prefill(half, FakeRequest("b", list(range(256))), [1, 2])))
    c = FakeRequest("c", list(range(256)))
    half.match(c, 0)
    half.on_alloc(c, [3, 4], 128)
    half.on_report(_ok(half.build_plan([]), success=False))
    half.check_settled()
    counters = half.take_counters()
    assert counters.failed_stores == 1 and counters.failed_loads == 1
    assert half.manager.stats.load_failures == 1


def test_jobs_settle_only_when_every_worker_reported() -> None:
    half = _half(world_size=2)
    plan = _prefill(half, FakeRequest("a", list(range(256))), [1, 2])
    half.on_report(_ok(plan))
    assert half.num_pending_jobs == 1 and half.manager.num_writing == 2
    half.on_report(_ok(plan))
    half.check_settled()


def test_full_pool_skips_stores_and_evicts_idle_blocks() -> None:
    half = _half(slots=2)
    half.on_report(_ok(_prefill(half, FakeRequest("a", list(range(256))), [1, 2])))
    b = FakeRequest("b", [5] * 256)
    plan = _prefill(half, b, [3, 4])  # evicts a's two idle blocks
    assert len(plan.stores[0].slots) == 2
    assert half.take_counters().evicted_blocks == 2
    c = FakeRequest("c", [6] * 256)
    assert not _prefill(half, c, [5, 6]).stores  # b's blocks are still being written
    assert half.take_counters().stores_skipped == 2
    half.on_report(_ok(plan))
    half.check_settled()


# -- worker half: real copies through the CPU engine -------------------------------------------
def test_worker_stores_then_loads_blocks_byte_for_byte() -> None:
    from kv_offload.vllm.metadata import JobSpec

    worker = WorkerHalf(OffloadConfig.from_dict({"cpu_bytes": "1MiB"}), GEOM)
    layers = _layers()
    worker.register(layers)
    expected = [t[[1, 2]].clone() for t in layers]
    worker.submit_stores(StepPlan(stores=(JobSpec(1, (1, 2), (0, 3)),)))
    assert all(o.success for o in _settle(worker, 1).outcomes)
    worker.flush(StepPlan(flush=(1,)))  # already done: returns at once
    worker.start_loads(StepPlan(loads=(JobSpec(2, (6, 5), (0, 3), req_id="r"),)))
    report = _settle(worker, 1)
    assert report.outcomes[0].success and report.outcomes[0].nbytes == 2 * GEOM.block_bytes
    assert worker.take_finished_recving() == {"r"}
    assert worker.take_invalid_blocks() == set()
    for t, e in zip(layers, expected):
        assert torch.equal(t[6], e[0]) and torch.equal(t[5], e[1])
    worker.shutdown()


@pytest.mark.parametrize("bad", ["injected", "out_of_range"])
def test_worker_failed_load_reports_request_and_blocks(bad: str) -> None:
    from kv_offload.vllm.metadata import JobSpec

    cfg = {"cpu_bytes": "1MiB", "fail_load_every": 1} if bad == "injected" else {"cpu_bytes": "1MiB"}
    worker = WorkerHalf(OffloadConfig.from_dict(cfg), GEOM)
    layers = _layers()
    worker.register(layers)
    before = [t.clone() for t in layers]
    slot = 10_000 if bad == "out_of_range" else 0
    worker.start_loads(StepPlan(loads=(JobSpec(1, (3, 4), (slot, 1), req_id="r"),)))
    report = _settle(worker, 1)
    assert not report.outcomes[0].success
    assert worker.take_finished_recving() == {"r"}
    assert worker.take_invalid_blocks() == {3, 4}
    # The injected fault left NaN there, as a broken copy could: the worker zeroes a failed
    # load's blocks, since vLLM reads whole blocks (masked) and 0 * NaN would poison outputs.
    for t, b in zip(layers, before):
        assert torch.equal(t[[3, 4]], torch.zeros_like(t[[3, 4]]))
        others = [i for i in range(t.shape[0]) if i not in (3, 4)]
        assert torch.equal(t[others], b[others])
    worker.shutdown()


def test_failed_load_is_not_offered_again() -> None:
    half = _half()
    half.on_report(_ok(_prefill(half, FakeRequest("a", list(range(384))), [1, 2, 3])))
    b = FakeRequest("b", list(range(384)) + [7])
    assert half.match(b, 0) == (384, True)
    half.on_alloc(b, [4, 5, 6, 7], 384)
    half.on_report(_ok(half.build_plan([]), success=False))
    half.check_settled()
    # vLLM recomputes b; asked again (or for another request) the pool must not offer the
    # same failing load: before, a request retried it forever with every load failing.
    assert half.match(b, 0) == (0, False)
    assert half.match(FakeRequest("c", list(range(384)) + [9]), 0) == (0, False)
    assert half.manager.stats.invalidated == 3


def test_no_block_is_stored_past_a_gap_and_the_gap_is_retried() -> None:
    half = _half(slots=4)
    other = FakeRequest("o", [9] * 2 * BS)
    half.on_report(_ok(_prefill(half, other, [20, 21])))
    assert half.match(FakeRequest("o2", [9] * 2 * BS + [1]), 0)[0] == 2 * BS
    half.on_alloc(FakeRequest("o2", [9] * 2 * BS + [1]), [22, 23, 24], 2 * BS)  # o's blocks are read
    loads = half.build_plan([])
    a = FakeRequest("a", list(range(6 * BS)))
    half.on_alloc(a, [1, 2, 3, 4, 5, 6], 0)
    s1 = ScheduledRequest(a, 0, 4 * BS, [1, 2, 3, 4, 5, 6])  # chunked prefill: 4 blocks, then 2
    plan = half.build_plan([s1])
    assert plan.stores[0].device_blocks == (1, 2)  # blocks 3, 4: no room while o's load runs
    half.on_report(_ok(plan))
    half.on_report(_ok(loads))  # o's load ends: its blocks may go now
    s2 = ScheduledRequest(a, 4 * BS, 2 * BS, [1, 2, 3, 4, 5, 6])
    plan = half.build_plan([s2])
    # The gap (blocks 3, 4) is offered again, first; nothing past it was stored before it.
    assert plan.stores[0].device_blocks == (3, 4)
    assert half.take_counters().stores_skipped == 2 + 2  # 3, 4 once; then 5, 6 behind the still-full gap
    half.on_report(_ok(plan))
    half.check_settled()
    assert half.match(FakeRequest("b", list(range(6 * BS)) + [1]), 0) == (4 * BS, True)


def test_pool_smaller_than_a_prompt_keeps_its_leading_blocks() -> None:
    half = _half(slots=2)
    a = FakeRequest("a", list(range(5 * BS)))
    plan = _prefill(half, a, [1, 2, 3, 4, 5])
    assert plan.stores and plan.stores[0].device_blocks == (1, 2)
    assert half.take_counters().stores_skipped == 3
    half.on_report(_ok(plan))
    half.check_settled()
    assert half.match(FakeRequest("b", list(range(5 * BS)) + [1]), 0) == (2 * BS, True)


def test_keys_are_content_keys_in_the_engines_namespace() -> None:
    from kv_offload.keys import KeyChain

    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0})
    manager = OffloadManager(16, LRUPolicy(16))
    ours = SchedulerHalf(config, manager, block_size=BS, namespace=b"a" * 16)
    a = FakeRequest("a", list(range(3 * BS)))
    assert ours.block_keys(a) == KeyChain(b"a" * 16, BS).keys(a.all_token_ids, 3)
    ours.on_report(_ok(_prefill(ours, a, [1, 2, 3])))
    # A restarted scheduler in the same namespace finds the blocks; another namespace does not.
    again = SchedulerHalf(config, manager, block_size=BS, namespace=b"a" * 16)
    assert again.match(FakeRequest("b", list(range(3 * BS)) + [5]), 0) == (3 * BS, True)
    other = SchedulerHalf(config, manager, block_size=BS, namespace=b"b" * 16)
    assert other.match(FakeRequest("c", list(range(3 * BS)) + [5]), 0) == (0, False)


def test_blocks_that_cannot_be_keyed_are_skipped_and_counted() -> None:
    def float_from_block_1(request: object) -> object:
        return lambda start, end, state: ((("weight", 0.5),) if start >= BS else None, state)

    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0})
    half = SchedulerHalf(config, OffloadManager(16, LRUPolicy(16)), block_size=BS, extra_keys=float_from_block_1)  # type: ignore[arg-type]
    plan = _prefill(half, FakeRequest("a", list(range(4 * BS))), [1, 2, 3, 4])
    assert plan.stores[0].device_blocks == (1,)  # only the block before the unkeyable one
    assert half.take_counters().stores_skipped == 3


def test_backend_on_stored_runs_off_the_step_and_before_close() -> None:
    from plugins import slow_flush_backend as plugin

    from kv_offload.vllm.metadata import JobSpec

    plugin.EVENTS.clear()
    plugin.RELEASE.clear()
    cfg = {"cpu_bytes": "1MiB", "backend": "SlowFlushBackend", "backend_module_path": "plugins.slow_flush_backend"}
    worker = WorkerHalf(OffloadConfig.from_dict(cfg), GEOM)
    worker.register(_layers())
    worker.submit_stores(StepPlan(stores=(JobSpec(1, (1, 2), (0, 3)),)))
    report = _settle(worker, 1)  # poll() returns although on_stored is still blocked
    assert report.outcomes[0].success
    deadline = time.monotonic() + 10
    while not plugin.EVENTS and time.monotonic() < deadline:
        time.sleep(0.001)
    assert plugin.EVENTS == ["on_stored:False"]  # on a worker thread, not the engine step
    plugin.RELEASE.set()
    worker.shutdown()
    assert plugin.EVENTS == ["on_stored:False", "flushed", "close"]  # finished before the region went


def test_file_backend_keeps_tensor_parallel_ranks_apart(tmp_path: "os.PathLike[str]") -> None:
    import os
    import sys

    from kv_offload.backends import BACKENDS, BackendSpec

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        cls = BACKENDS.resolve("FileBackend", module_path="file_backend")
    finally:
        sys.path.pop(0)
    regions = []
    for rank in range(2):
        spec = BackendSpec(capacity_bytes=4 * GEOM.slot_bytes, geometry=GEOM, options={"path": str(tmp_path)},
                           world_size=2, rank=rank)  # fmt: skip
        backend = cls(spec)
        region = backend.open()
        region[1].fill_(10 + rank)  # each rank writes its own shard of block 1
        regions.append((backend, region))
    assert int(regions[0][1][1, 0]) == 10 and int(regions[1][1][1, 0]) == 11
    assert sorted(os.listdir(tmp_path)) == ["kv_offload_blocks.rank0.bin", "kv_offload_blocks.rank1.bin"]
    for backend, region in regions:
        del region
        backend.close()
