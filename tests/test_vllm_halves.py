# SPDX-License-Identifier: Apache-2.0
"""The connector's two halves without vLLM: planning, fences, settling, and real copies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

from kv_offload.config import OffloadConfig
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.vllm.metadata import JobOutcome, StepPlan, TransferReport
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf

BS = 128


@dataclass
class FakeRequest:
    request_id: str
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt + self.output


def _half(slots: int = 16, world_size: int = 1, **cfg: object) -> SchedulerHalf:
    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0, **cfg})
    return SchedulerHalf(config, OffloadManager(slots, LRUPolicy(slots)), block_size=BS, world_size=world_size)


def _ok(plan: StepPlan, success: bool = True) -> TransferReport:
    jobs = [(j, False) for j in plan.stores] + [(j, True) for j in plan.loads]
    return TransferReport([JobOutcome(j.job_id, success, 100 * len(j.slots), 0.001, load) for j, load in jobs])


def _prefill(half: SchedulerHalf, req: FakeRequest, blocks: list[int]) -> StepPlan:
    half.on_alloc(req, blocks, 0)
    plan = half.build_plan([ScheduledRequest(req, req.num_computed_tokens, req.num_tokens, blocks)])
    req.num_computed_tokens = req.num_tokens
    return plan


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
GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_size=8, block_size=BS, dtype=torch.float32,
                  page_format=PageFormat.CPU)  # fmt: skip


def _layers() -> list[torch.Tensor]:
    return [torch.randn(8, 2, BS, 16) for _ in range(2)]


def _settle(worker: WorkerHalf, n: int) -> TransferReport:
    outcomes: list[JobOutcome] = []
    deadline = time.monotonic() + 10
    while len(outcomes) < n and time.monotonic() < deadline:
        worker.poll()
        report = worker.take_report()
        outcomes += report.outcomes if report else []
        time.sleep(0.001)
    assert len(outcomes) == n
    return TransferReport(outcomes)


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


# -- the disk tier: write-through, restart, promotion (real files, real copies) --------------------
def _disk_halves(tmp: str, fail_load_every: int = 0) -> tuple[SchedulerHalf, WorkerHalf, object]:
    from kv_offload.vllm.worker import open_disk_tier

    cfg = OffloadConfig.from_dict({"cpu_bytes": 4 * GEOM.slot_bytes, "disk": {"path": tmp, "bytes": "64MiB"}, "sync_load_max_bytes": 0,
                                   "fail_load_every": fail_load_every})  # fmt: skip
    index = open_disk_tier(cfg.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(cfg, OffloadManager(4, LRUPolicy(4)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(cfg, GEOM, namespace=b"n" * 16)
    return half, worker, index


def _step(half: SchedulerHalf, worker: WorkerHalf, scheduled: list[ScheduledRequest]) -> StepPlan:
    plan = half.build_plan(scheduled)
    worker.flush(plan)
    worker.start_loads(plan)
    worker.submit_stores(plan)
    return plan


def _run_until_settled(half: SchedulerHalf, worker: WorkerHalf) -> None:
    deadline = time.monotonic() + 20
    while (half.num_pending_jobs or worker.num_in_flight) and time.monotonic() < deadline:
        if not half._jobs:  # write-backs queued: the next step plans them
            _step(half, worker, [])
        worker.poll()
        report = worker.take_report()
        if report:
            half.on_report(report)
        time.sleep(0.002)
    half.check_settled()


def test_disk_tier_survives_a_restart_and_promotes_through_the_pool(tmp_path: "os.PathLike[str]") -> None:
    tmp = str(tmp_path)
    layers = _layers()
    half, worker, index = _disk_halves(tmp)
    worker.register(layers)
    a = FakeRequest("a", list(range(3 * BS)))
    half.on_alloc(a, [1, 2, 3], 0)
    _step(half, worker, [ScheduledRequest(a, 0, 3 * BS, [1, 2, 3])])
    _run_until_settled(half, worker)
    counters = half.take_counters()
    assert counters.written_back_blocks == 3
    assert [t[0] for t in counters.transfers] == ["store", "writeback"]
    expected = [t[[1, 2, 3]].clone() for t in layers]
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]

    # A new process: an empty pool, a new KV cache; the disk still has the blocks.
    layers2 = _layers()
    half, worker, index = _disk_halves(tmp)
    worker.register(layers2)
    b = FakeRequest("b", list(range(3 * BS)) + [7])
    assert half.match(b, 0) == (3 * BS, True)
    half.on_alloc(b, [5, 6, 4, 0], 3 * BS)
    plan = _step(half, worker, [])
    assert len(plan.promotes) == 1 and not plan.loads
    _run_until_settled(half, worker)
    assert worker.take_finished_recving() == {"b"} and worker.take_invalid_blocks() == set()
    for t, e in zip(layers2, expected):
        assert torch.equal(t[[5, 6, 4]], e)  # byte for byte, through disk and pool
    counters = half.take_counters()
    assert counters.promoted_blocks == 3 and counters.disk_hit_tokens == 3 * BS
    (promote,) = [t for t in counters.transfers if t[0] == "promote"]  # its throughput, both legs
    assert promote[1] == 3 * GEOM.block_bytes and promote[2] > 0
    # Promoted blocks are pool blocks now: the next hit comes from DRAM.
    assert half.match(FakeRequest("c", list(range(3 * BS)) + [9]), 0) == (3 * BS, True)
    assert half._matches["c"][1:] == (3, (0,), False)
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]


def test_a_corrupt_disk_block_is_a_miss_and_the_request_recomputes(tmp_path: "os.PathLike[str]") -> None:
    import glob
    import os

    tmp = str(tmp_path)
    half, worker, index = _disk_halves(tmp)
    worker.register(_layers())
    a = FakeRequest("a", list(range(2 * BS)))
    half.on_alloc(a, [1, 2], 0)
    _step(half, worker, [ScheduledRequest(a, 0, 2 * BS, [1, 2])])
    _run_until_settled(half, worker)
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]
    for path in glob.glob(os.path.join(tmp, "**", "*.dat"), recursive=True):
        with open(path, "r+b") as f:  # flip bytes in every stored body
            data = bytearray(f.read())
            for i in range(0, len(data), 4096):
                data[i] ^= 0xFF
            f.seek(0)
            f.write(data)
    layers = _layers()
    before = [t.clone() for t in layers]
    half, worker, index = _disk_halves(tmp)
    worker.register(layers)
    b = FakeRequest("b", list(range(2 * BS)) + [1])
    assert half.match(b, 0) == (2 * BS, True)
    half.on_alloc(b, [3, 4, 5], 2 * BS)
    _step(half, worker, [])
    _run_until_settled(half, worker)
    assert worker.take_finished_recving() == {"b"} and worker.take_invalid_blocks() == {3, 4}
    counters = half.take_counters()
    assert counters.failed_promotes == 1 and counters.promoted_blocks == 0
    assert worker.tier is not None and worker.tier.stats().corruptions >= 1
    others = [i for i in range(8) if i not in (3, 4)]
    for t, b0 in zip(layers, before):
        assert torch.equal(t[others], b0[others])
        assert not torch.isnan(t[[3, 4]]).any()
    assert half.manager.num_used == 0  # the failed promotion freed its reserved slots
    # The disk still lists the blocks, but this scheduler never offers them again: the request
    # that recomputes must not retry the same failing promotion (nor must anyone else).
    assert half.match(FakeRequest("b2", list(range(2 * BS)) + [1]), 0) == (0, False)
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]


def test_a_tier_that_cannot_answer_yet_defers_the_request() -> None:
    class SlowIndex:
        """Answers "not known yet" until its lookup lands, then holds every key asked about."""

        def __init__(self) -> None:
            self.ready = False

        def contains(self, keys: object) -> list[bool] | None:
            return [True] * len(keys) if self.ready else None  # type: ignore[arg-type]

    index = SlowIndex()
    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0})
    half = SchedulerHalf(config, OffloadManager(8, LRUPolicy(8)), block_size=BS, disk=index)
    req = FakeRequest("a", list(range(3 * BS)) + [1])
    assert half.match(req, 0) == (None, False)  # vLLM skips the request this step, asks again
    assert "a" not in half._matches
    index.ready = True
    assert half.match(req, 0) == (3 * BS, True)


@pytest.mark.parametrize("fail_chunk", [None, 1])
def test_a_promotion_is_pipelined_chunk_by_chunk(
    tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch, fail_chunk: int | None
) -> None:
    """Chunks of one block each: every chunk's copy starts once its read is verified. A chunk
    whose read fails fails the whole promotion, and its blocks are zeroed only after every
    copy into them ended."""
    import glob
    import os

    from kv_offload.vllm import worker as worker_mod

    monkeypatch.setattr(worker_mod, "PROMOTE_CHUNK_BYTES", GEOM.slot_bytes)
    tmp = str(tmp_path)
    half, worker, index = _disk_halves(tmp)
    layers = _layers()
    worker.register(layers)
    a = FakeRequest("a", list(range(3 * BS)))
    half.on_alloc(a, [1, 2, 3], 0)
    _step(half, worker, [ScheduledRequest(a, 0, 3 * BS, [1, 2, 3])])
    _run_until_settled(half, worker)
    expected = [t[[1, 2, 3]].clone() for t in layers]
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]
    if fail_chunk is not None:  # corrupt the second block's body on disk
        (dat,) = glob.glob(os.path.join(tmp, "**", "*.dat"), recursive=True)
        with open(dat, "r+b") as f:
            data = bytearray(f.read())
            data[fail_chunk * GEOM.slot_bytes + 7] ^= 0xFF
            f.seek(0)
            f.write(data)
    half, worker, index = _disk_halves(tmp)
    layers2 = _layers()
    before = [t.clone() for t in layers2]
    worker.register(layers2)
    submitted: list[tuple[int, ...]] = []
    engine = worker._engine()
    original = engine.submit

    def submit(job: object) -> None:
        submitted.append(tuple(int(b) for b in job.device_blocks))  # type: ignore[attr-defined]
        original(job)  # type: ignore[arg-type]

    engine.submit = submit  # type: ignore[method-assign]
    b = FakeRequest("b", list(range(3 * BS)) + [7])
    assert half.match(b, 0) == (3 * BS, True)
    half.on_alloc(b, [5, 6, 4, 0], 3 * BS)
    plan = _step(half, worker, [])
    (promote,) = plan.promotes
    _run_until_settled(half, worker)
    assert worker.take_finished_recving() == {"b"}
    counters = half.take_counters()
    if fail_chunk is None:
        assert sorted(submitted) == [(4,), (5,), (6,)]  # one copy per chunk
        assert worker.take_invalid_blocks() == set()
        for t, e in zip(layers2, expected):
            assert torch.equal(t[[5, 6, 4]], e)
        assert counters.promoted_blocks == 3
    else:
        assert (6,) not in submitted  # the corrupt chunk never reached the KV cache
        assert worker.take_invalid_blocks() == {5, 6, 4}
        for t, b0 in zip(layers2, before):
            assert not t[[5, 6, 4]].any()  # zeroed, whatever chunks landed before
            others = [i for i in range(t.shape[0]) if i not in (4, 5, 6)]
            assert torch.equal(t[others], b0[others])
        assert counters.failed_promotes == 1 and half.manager.num_used == 0
    assert not worker._promotions and not worker._chunk_of
    worker.shutdown()
    index.close()  # type: ignore[attr-defined]


class _HeldIndex:
    """A lower tier's index that holds a fixed set of keys (answers at once)."""

    def __init__(self, held: set[bytes]) -> None:
        self.held = held
        self.asked: list[int] = []

    def contains(self, keys: "list[bytes]") -> list[bool]:
        self.asked.append(len(keys))
        return [k in self.held for k in keys]


def test_lookups_go_down_the_tiers_and_a_failed_remote_block_is_retried_later() -> None:
    from kv_offload.vllm import scheduler as scheduler_mod

    config = OffloadConfig.from_dict({"cpu_bytes": "1MiB", "sync_load_max_bytes": 0})
    half = SchedulerHalf(config, OffloadManager(16, LRUPolicy(16)), block_size=BS,
                         disk=_HeldIndex(set()), remote=_HeldIndex(set()))  # fmt: skip
    req = FakeRequest("a", list(range(6 * BS)) + [1])
    keys = half.block_keys(req, 6)
    disk, remote = half.tiers["disk"].index, half.tiers["remote"].index
    disk.held, remote.held = {keys[2], keys[3]}, set(keys)  # type: ignore[attr-defined]
    half.on_report(_ok(_prefill(half, FakeRequest("p", list(range(2 * BS))), [7, 8])))  # the pool: blocks 0-1
    assert half.match(req, 0) == (6 * BS, True)
    assert half._matches["a"][1:] == (2, (2, 2), False)  # pool 2, disk 2, remote 2; asynchronous
    assert disk.asked[-1] == 4 and remote.asked[-1] == 2  # each asked only for what the ones above lack  # type: ignore[attr-defined]
    half.on_alloc(req, [1, 2, 3, 4, 5, 6, 9], 6 * BS)
    plan = half.build_plan([])
    assert [(p.tier, len(p.keys)) for p in plan.promotes] == [("disk", 2), ("remote", 2)]
    assert len(plan.loads) == 1 and plan.loads[0].device_blocks == (1, 2)
    (remote_job,) = [p for p in plan.promotes if p.tier == "remote"]
    outcomes = [JobOutcome(j.job_id, j is not remote_job, 0, 0.01, True) for j in plan.loads + plan.promotes]
    half.on_report(TransferReport(outcomes))
    counters = half.take_counters()
    assert counters.remote_hit_tokens == 2 * BS and counters.disk_hit_tokens == 2 * BS
    assert counters.remote_failed_promotes == 1 and counters.promoted_blocks == 2
    # The disk's promoted blocks are pool blocks now; the failed remote ones are refused ...
    assert half.match(FakeRequest("b", list(range(6 * BS)) + [2]), 0) == (4 * BS, True)
    # ... for a while only: the store may have been down, or another instance writes them again.
    assert half.tiers["remote"].failed_ttl_s == scheduler_mod.REMOTE_RETRY_S > 0
    half.tiers["remote"].failed_ttl_s = 0.001  # as if REMOTE_RETRY_S had passed
    time.sleep(0.01)
    c = FakeRequest("c", list(range(6 * BS)) + [3])
    assert half.match(c, 0) == (6 * BS, True)
    assert half._matches["c"][1:] == (4, (0, 2), False)
    half.on_alloc(c, [10, 11, 12, 13, 14, 15, 9], 6 * BS)
    plan = half.build_plan([])
    (promote,) = plan.promotes
    assert promote.tier == "remote" and promote.keys == tuple(keys[4:6])
    half.on_report(TransferReport([JobOutcome(j.job_id, True, 0, 0.01, True) for j in plan.loads + plan.promotes]))
    # Blocks promoted from the remote tier are written through to the disk above it.
    plan = half.build_plan([])
    assert [(w.tier, w.keys) for w in plan.writebacks] == [("disk", tuple(keys[4:6]))]


@pytest.mark.parametrize("fail", [False, True])
def test_a_small_pool_hit_is_loaded_before_the_forward_pass(fail: bool) -> None:
    """A hit all in the pool, within ``sync_load_max_bytes``: vLLM is told the load is
    synchronous (it schedules the request in the same step), the worker's ``start_loads``
    returns with the blocks in place (or, failed, zeroed and reported), and the request is
    never reported as finished receiving (it never waited)."""
    cfg = {"cpu_bytes": "1MiB", "sync_load_max_bytes": 2 * GEOM.block_bytes}
    if fail:
        cfg["fail_load_every"] = 1
    config = OffloadConfig.from_dict(cfg)
    half = SchedulerHalf(config, OffloadManager(16, LRUPolicy(16), block_bytes=GEOM.block_bytes), block_size=BS)
    worker = WorkerHalf(config, GEOM)
    layers = _layers()
    worker.register(layers)
    a = FakeRequest("a", list(range(3 * BS)))
    half.on_alloc(a, [1, 2, 3], 0)
    _step(half, worker, [ScheduledRequest(a, 0, 3 * BS, [1, 2, 3])])
    _run_until_settled(half, worker)
    expected = [t[[1, 2]].clone() for t in layers]
    before = [t.clone() for t in layers]
    # Two blocks fit the limit: synchronous. Three would not: asynchronous, as before.
    assert half.match(FakeRequest("x", list(range(3 * BS)) + [1]), 0) == (3 * BS, True)
    b = FakeRequest("b", list(range(2 * BS)) + [5])
    assert half.match(b, 0) == (2 * BS, False)
    half.on_alloc(b, [6, 5, 7], 2 * BS)
    plan = half.build_plan([ScheduledRequest(b, 2 * BS, 1, [6, 5, 7])])
    (load,) = plan.loads
    assert load.sync and load.req_id == "b"
    worker.flush(plan)
    worker.start_loads(plan)  # returns once the copy is done: the forward pass reads it next
    if fail:
        assert worker.take_invalid_blocks() == {6, 5}
        for t in layers:
            assert not t[[6, 5]].any()  # zeroed before the forward pass
    else:
        assert worker.take_invalid_blocks() == set()
        for t, e in zip(layers, expected):
            assert torch.equal(t[6], e[0]) and torch.equal(t[5], e[1])
    others = [i for i in range(8) if i not in (5, 6)]
    for t, b0 in zip(layers, before):
        assert torch.equal(t[others], b0[others])
    worker.submit_stores(plan)
    _run_until_settled(half, worker)
    assert worker.take_finished_recving() == set()  # b never waited for it
    counters = half.take_counters()
    assert counters.loaded_blocks == (0 if fail else 2) and counters.failed_loads == (1 if fail else 0)
    worker.shutdown()
