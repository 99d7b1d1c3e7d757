# SPDX-License-Identifier: Apache-2.0
"""The connector's two halves with tiers below the pool, without vLLM: write-through,
restart and promotion through the disk tier (real files, real copies), lookups down the
tiers, pipelined promotions, and synchronous pool loads."""

from __future__ import annotations

import time

import pytest
import torch

from kv_offload.config import OffloadConfig
from kv_offload.manager import OffloadManager
from kv_offload.policies.lru import LRUPolicy
from kv_offload.vllm.metadata import JobOutcome, TransferReport
from kv_offload.vllm.scheduler import ScheduledRequest, SchedulerHalf
from kv_offload.vllm.worker import WorkerHalf
from halves_helpers import BS, GEOM, FakeRequest
from halves_helpers import make_layers as _layers
from halves_helpers import ok_report as _ok
from halves_helpers import prefill as _prefill
from halves_helpers import run_until_settled as _run_until_settled
from halves_helpers import settle as _settle
from halves_helpers import step as _step


# -- the disk tier: write-through, restart, promotion (real files, real copies) --------------------
def _disk_halves(tmp: str, fail_load_every: int = 0) -> tuple[SchedulerHalf, WorkerHalf, object]:
    from kv_offload.vllm.worker import open_disk_tier

    cfg = OffloadConfig.from_dict({"cpu_bytes": 4 * GEOM.slot_bytes, "disk": {"path": tmp, "bytes": "64MiB"}, "sync_load_max_bytes": 0,
                                   "fail_load_every": fail_load_every})  # fmt: skip
    index = open_disk_tier(cfg.disk, GEOM.slot_bytes, b"n" * 16)  # type: ignore[arg-type]
    half = SchedulerHalf(cfg, OffloadManager(4, LRUPolicy(4)), block_size=BS, namespace=b"k" * 16, disk=index)
    worker = WorkerHalf(cfg, GEOM, namespace=b"n" * 16)
    return half, worker, index


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


def test_a_stored_block_is_written_through_before_the_next_store_can_evict_it(tmp_path: "os.PathLike[str]") -> None:
    """A store that settled is pinned for its write-back before the step's new stores take
    pool room: otherwise a full pool evicts it first and it reaches no tier below (found by
    counting skipped write-backs on the soak)."""
    half, worker, index = _disk_halves(str(tmp_path))  # a pool of 4 blocks
    layers = _layers()
    worker.register(layers)
    w = FakeRequest("w", [1] * 2 * BS)
    half.on_alloc(w, [0, 1], 0)
    _step(half, worker, [ScheduledRequest(w, 0, 2 * BS, [0, 1])])
    _run_until_settled(half, worker)  # w's blocks: in the pool, written through
    assert half.take_counters().written_back_blocks == 2
    x = FakeRequest("x", [2] * 2 * BS)
    half.on_alloc(x, [2, 3], 0)
    plan = _step(half, worker, [ScheduledRequest(x, 0, 2 * BS, [2, 3])])
    half.on_report(_settle(worker, len(plan.stores)))  # x's store settled: its write-back is due
    # The next step brings a 4-block prompt: room for it means evicting 4 of the pool's blocks.
    y = FakeRequest("y", [3] * 4 * BS)
    half.on_alloc(y, [4, 5, 6, 7], 0)
    plan = _step(half, worker, [ScheduledRequest(y, 0, 4 * BS, [4, 5, 6, 7])])
    assert [len(j.keys) for j in plan.writebacks] == [2]  # x's blocks, pinned first
    assert len(plan.stores[0].slots) == 2  # y's leading blocks take w's room, not x's
    _run_until_settled(half, worker)
    counters = half.take_counters()
    assert counters.writebacks_skipped == 0 and counters.written_back_blocks == 2 + 2, counters  # x's, y's two
    assert all(k in half.tiers["disk"].written for k in half.block_keys(x))
    assert counters.stores_skipped == 2  # y's last two blocks found no room, and are counted
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
