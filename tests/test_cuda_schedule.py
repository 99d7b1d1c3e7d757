# SPDX-License-Identifier: Apache-2.0
"""The CUDA engine's scheduling on CPU: ordering, FIFO, completion, errors.

``CudaTransferEngine`` is driven here with a deterministic CPU implementation of its
stream/event protocol (:class:`SimDevice`): every stream is a queue of operations, an
operation runs only when the device is stepped, and waits block a stream until the event's
captured work ran. Copies are real ``memmove`` s between real buffers (CPU tensors stand in
for device memory), so the tests check bytes, not call logs. The schedule picks which
runnable stream goes next: ``side_first`` runs transfer streams before the compute stream
whenever it may, which is the order that exposes a missing compute->transfer barrier;
``compute_first`` exposes a missing transfer->compute barrier.
"""

from __future__ import annotations

import collections
import ctypes
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.transfer import Direction, TransferError, TransferJob, TransferResult, regions_from_layers
from kv_offload.transfer.cuda_batch import CopyCall, CopyMethod, CopyPolicy
from kv_offload.transfer.cuda_engine import CudaTransferEngine
from kv_offload.transfer.stream_schedule import Event, Stream

# --------------------------------------------------------------------------------------------
# A deterministic device


class SimStream:
    def __init__(self, device: SimDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.ops: collections.deque[tuple[str, object, int]] = collections.deque()
        self.faulted = False

    def wait_event(self, event: Event) -> None:
        ev = event if isinstance(event, SimEvent) else None
        assert ev is not None
        # CUDA semantics: wait for the record enqueued most recently *at this call*.
        self.ops.append(("wait", ev, ev.recorded))


class SimEvent:
    def __init__(self, device: SimDevice, timing: bool) -> None:
        self.device = device
        self.timing = timing
        self.recorded = 0  # generation of the latest record() call
        self.done = 0  # generation of the latest record that ran
        self.time = 0.0
        self.error: str | None = None

    def record(self, stream: Stream) -> None:
        assert isinstance(stream, SimStream)
        self.recorded += 1
        stream.ops.append(("record", self, self.recorded))

    def query(self) -> bool:
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.done >= self.recorded

    def synchronize(self) -> None:
        self.device.run_until(lambda: self.done >= self.recorded)
        self.query()

    def elapsed_seconds(self, end: Event) -> float:
        assert isinstance(end, SimEvent) and self.timing and end.timing
        assert self.query() and end.query()
        return end.time - self.time


class SimDevice:
    def __init__(self, schedule: str = "random", seed: int = 0) -> None:
        self.schedule = schedule
        self.rng = random.Random(seed)
        self.compute = SimStream(self, "compute")
        self.streams: list[SimStream] = [self.compute]
        self.clock = 0.0
        self.ran = 0
        #: streams the schedule must not pick (to hold one lane back)
        self.paused: set[int] = set()

    def new_stream(self, name: str) -> SimStream:
        s = SimStream(self, name)
        self.streams.append(s)
        return s

    def _runnable(self, s: SimStream) -> bool:
        if not s.ops:
            return False
        kind, obj, gen = s.ops[0]
        return kind != "wait" or (isinstance(obj, SimEvent) and obj.done >= gen)

    def step(self) -> bool:
        ready = [s for s in self.streams if id(s) not in self.paused and self._runnable(s)]
        if not ready:
            return False
        side = [s for s in ready if s is not self.compute]
        if self.schedule == "side_first" and side:
            ready = side
        elif self.schedule == "compute_first" and self.compute in ready:
            ready = [self.compute]
        s = self.rng.choice(ready)
        kind, obj, gen = s.ops.popleft()
        self.clock += 1e-3
        self.ran += 1
        if kind == "record":
            assert isinstance(obj, SimEvent)
            obj.done = max(obj.done, gen)
            obj.time = self.clock
            if s.faulted:
                obj.error = "simulated illegal address"
        elif kind == "fn":
            assert callable(obj)
            obj()
        return True

    def run_until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            if not self.step():
                raise AssertionError("simulated device deadlocked")

    def drain(self) -> None:
        while self.step():
            pass
        assert not any(s.ops for s in self.streams), "work left behind unsatisfiable waits"

    def launch(self, fn: Callable[[], None], stream: SimStream | None = None) -> None:
        """A 'kernel': ``fn`` runs when the stream reaches it."""
        (stream or self.compute).ops.append(("fn", fn, 0))


def _memmove_calls(calls: Sequence[CopyCall]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            b = call.batch
            for s, d, n in zip(b.src.tolist(), b.dst.tolist(), b.sizes.tolist()):
                ctypes.memmove(d, s, n)

    return run


@dataclass
class SimBackend:
    device: SimDevice
    calls: list[tuple[Direction, list[CopyCall]]] = field(default_factory=list)
    fail_enqueue: int = 0  # the next N enqueue_copies raise (after enqueueing half the calls)
    fault_next: bool = False  # the next job's copies "fault" asynchronously

    def new_stream(self) -> Stream:
        return self.device.new_stream(f"side{len(self.device.streams)}")

    def new_event(self, timing: bool) -> Event:
        return SimEvent(self.device, timing)

    def current_stream(self) -> Stream:
        return self.device.compute

    def as_stream(self, stream: object | None) -> Stream:
        if stream is None:
            return self.device.compute
        assert isinstance(stream, SimStream)
        return stream

    def enqueue_copies(self, calls: Sequence[CopyCall], stream: Stream, direction: Direction) -> None:
        assert isinstance(stream, SimStream) and stream is not self.device.compute
        self.calls.append((direction, list(calls)))
        if self.fail_enqueue:
            self.fail_enqueue -= 1
            stream.ops.append(("fn", _memmove_calls(calls[: len(calls) // 2]), 0))
            raise RuntimeError("simulated CUDA_ERROR_INVALID_VALUE")
        if self.fault_next:
            self.fault_next = False

            def fault(s: SimStream = stream) -> None:
                s.faulted = True

            stream.ops.append(("fn", fault, 0))
            return
        stream.ops.append(("fn", _memmove_calls(calls), 0))


# --------------------------------------------------------------------------------------------
# KV caches in vLLM's layouts (CPU tensors standing in for device memory)

NUM_BLOCKS = 16
NUM_SLOTS = 12
GEOMETRY = KVGeometry(
    num_layers=4, num_kv_heads=2, head_size=16, block_size=8, dtype=torch.bfloat16, page_format=PageFormat.HND
)


def make_layers(layout: str, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``LBHNC``: a [L, B, H, N, C] storage, layer views contiguous; ``BLHNC``: [B, L, H, N, C]."""
    g = GEOMETRY
    shape_tail = (g.num_kv_heads, g.block_size, g.head_size + g.v_head_size)
    gen = torch.Generator().manual_seed(seed)
    if layout == "LBHNC":
        storage = torch.randn(g.num_layers, NUM_BLOCKS, *shape_tail, generator=gen).to(g.dtype)
        return storage, [storage[i] for i in range(g.num_layers)]
    storage = torch.randn(NUM_BLOCKS, g.num_layers, *shape_tail, generator=gen).to(g.dtype)
    return storage, [storage[:, i] for i in range(g.num_layers)]


def page_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def host_page(pool: torch.Tensor, slot: int, layer: int) -> torch.Tensor:
    off = GEOMETRY.page_offset(layer)
    return pool[slot, off : off + GEOMETRY.page_bytes]


class Rig:
    def __init__(self, layout: str = "LBHNC", schedule: str = "random", seed: int = 0, **kw: object) -> None:
        self.device = SimDevice(schedule, seed)
        self.backend = SimBackend(self.device)
        self.storage, self.layers = make_layers(layout, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.pool = torch.randint(0, 256, (NUM_SLOTS, GEOMETRY.slot_bytes), dtype=torch.uint8, generator=gen)
        policy = kw.pop("policy", CopyPolicy(batch_available=True))
        assert isinstance(policy, CopyPolicy)
        self.engine = CudaTransferEngine(
            regions_from_layers(self.layers, GEOMETRY), self.pool, backend=self.backend, policy=policy, **kw  # type: ignore[arg-type]
        )

    def drain_poll(self) -> list[TransferResult]:
        self.device.drain()
        return self.engine.poll()

    def poll_all(self) -> dict[int, bool]:
        return {r.job_id: r.success for r in self.drain_poll()}


LAYOUTS = ("LBHNC", "BLHNC")


# --------------------------------------------------------------------------------------------
# Exact copies


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(6))
def test_store_and_load_copy_exactly_the_mapped_blocks(layout: str, seed: int) -> None:
    rig = Rig(layout, seed=seed)
    rng = random.Random(seed)
    n = rng.randint(1, NUM_SLOTS)
    blocks = rng.sample(range(NUM_BLOCKS), n)
    slots = rng.sample(range(NUM_SLOTS), n)
    storage_before = rig.storage.clone()
    pool_before = rig.pool.clone()
    rig.engine.submit(TransferJob.make(1, Direction.STORE, blocks, slots))
    assert rig.poll_all() == {1: True}
    assert torch.equal(rig.storage, storage_before), "a store changed its source"
    for b, s in zip(blocks, slots):
        for layer in range(GEOMETRY.num_layers):
            assert torch.equal(host_page(rig.pool, s, layer), page_bytes(rig.layers[layer][b]))
    for s in set(range(NUM_SLOTS)) - set(slots):
        assert torch.equal(rig.pool[s], pool_before[s]), f"untouched slot {s} changed"
    tail = GEOMETRY.block_bytes
    assert torch.equal(rig.pool[:, tail:], pool_before[:, tail:]), "slot padding changed"

    # Load the slots back into other blocks; the rest of the cache stays as it was.
    targets = rng.sample(range(NUM_BLOCKS), n)
    pool_after_store = rig.pool.clone()
    expected = [page_bytes(rig.layers[layer][b]).clone() for b in blocks for layer in range(GEOMETRY.num_layers)]
    others = {(layer, b): page_bytes(rig.layers[layer][b]).clone() for layer in range(4) for b in range(NUM_BLOCKS)}
    rig.engine.submit(TransferJob.make(2, Direction.LOAD, targets, slots))
    assert rig.poll_all() == {2: True}
    assert torch.equal(rig.pool, pool_after_store), "a load changed its source"
    i = 0
    for b in targets:
        for layer in range(GEOMETRY.num_layers):
            assert torch.equal(page_bytes(rig.layers[layer][b]), expected[i])
            i += 1
    for (layer, b), before in others.items():
        if b not in targets:
            assert torch.equal(page_bytes(rig.layers[layer][b]), before), f"untouched block {b} changed"


def test_packed_layout_submits_one_descriptor_per_block_and_per_layer_pages_one_per_page() -> None:
    for layout, per_block in (("BLHNC", 1), ("LBHNC", GEOMETRY.num_layers)):
        rig = Rig(layout)
        rig.engine.submit(TransferJob.make(1, Direction.STORE, [3, 9, 4], [0, 5, 1]))
        (direction, calls), = rig.backend.calls
        assert direction is Direction.STORE
        assert sum(c.batch.num_descriptors for c in calls) == 3 * per_block
        assert sum(c.batch.total_bytes for c in calls) == 3 * GEOMETRY.block_bytes
        assert rig.poll_all() == {1: True}


def test_small_descriptor_cap_splits_a_job_into_several_calls_with_the_same_result() -> None:
    rig = Rig("LBHNC", policy=CopyPolicy(batch_available=True, max_descriptors=5))
    blocks, slots = [0, 2, 4, 6], [7, 1, 3, 5]
    rig.engine.submit(TransferJob.make(1, Direction.STORE, blocks, slots))
    (_, calls), = rig.backend.calls
    assert [c.batch.num_descriptors for c in calls] == [5, 5, 5, 1]
    assert [c.method for c in calls] == [CopyMethod.BATCH] * 3 + [CopyMethod.LOOP]
    assert rig.poll_all() == {1: True}
    for b, s in zip(blocks, slots):
        for layer in range(4):
            assert torch.equal(host_page(rig.pool, s, layer), page_bytes(rig.layers[layer][b]))


# --------------------------------------------------------------------------------------------
# Ordering


def test_the_simulator_exposes_a_missing_compute_barrier() -> None:
    """Without a wait, side_first runs a copy before an earlier kernel: the barrier tests mean something."""
    dev = SimDevice("side_first")
    src = torch.zeros(8, dtype=torch.uint8)
    dst = torch.zeros(8, dtype=torch.uint8)
    side = dev.new_stream("side")
    dev.launch(lambda: src.fill_(7))
    side.ops.append(("fn", lambda: dst.copy_(src), 0))
    dev.drain()
    assert int(dst[0]) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(4))
def test_store_after_a_kernel_copies_the_values_the_kernel_wrote(layout: str, seed: int) -> None:
    rig = Rig(layout, schedule="side_first", seed=seed)
    block = seed % NUM_BLOCKS
    # The "forward pass" writes the block on the compute stream; the store is submitted
    # right after, before the kernel ran.
    def forward() -> None:
        for layer in rig.layers:
            layer[block].fill_(3.0)

    rig.device.launch(forward)
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [block], [2]))
    assert rig.poll_all() == {1: True}
    expected = torch.full_like(rig.layers[0][block], 3.0)
    for layer in range(4):
        assert torch.equal(host_page(rig.pool, 2, layer), page_bytes(expected))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_then_wait_on_stream_makes_the_compute_stream_see_the_loaded_values(layout: str) -> None:
    for use_barrier in (True, False):
        rig = Rig(layout, schedule="compute_first")
        rig.pool[4].fill_(0x3F)  # bf16 0x3F3F
        seen: list[torch.Tensor] = []
        rig.engine.submit(TransferJob.make(1, Direction.LOAD, [5], [4]))
        if use_barrier:
            rig.engine.wait_on_stream([1])
        rig.device.launch(lambda: seen.append(page_bytes(rig.layers[2][5]).clone()))
        rig.device.drain()
        loaded = bool((seen[0] == 0x3F).all())
        # With the barrier the read must see the load; without it this schedule reads stale
        # bytes (showing the barrier is what makes the difference).
        assert loaded is use_barrier


def test_jobs_of_one_direction_finish_in_submission_order_across_pooled_streams() -> None:
    for seed in range(20):
        rig = Rig("BLHNC", seed=seed, streams_per_direction=3)
        order: list[int] = []
        for j in range(6):
            rig.engine.submit(TransferJob.make(j, Direction.STORE, [j], [j]))
        while rig.device.step():
            order += [r.job_id for r in rig.engine.poll()]
        order += [r.job_id for r in rig.engine.poll()]
        assert order == list(range(6))


def test_fifo_holds_even_when_a_later_job_is_on_an_idle_stream() -> None:
    """Job 1 sits on another pool stream; it must still wait for job 0's copies."""
    rig = Rig("BLHNC", schedule="side_first", streams_per_direction=2)
    rig.engine.submit(TransferJob.make(0, Direction.STORE, [1], [1]))
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [2], [2]))
    streams_used = {id(s) for s in rig.device.streams[1:] if s.ops}
    assert len(streams_used) == 2
    done: list[int] = []
    while rig.device.step():
        done += [r.job_id for r in rig.engine.poll()]
        assert done in ([], [0], [0, 1])
    assert done == [0, 1]


@pytest.mark.parametrize("direction", list(Direction))
def test_later_job_of_a_direction_lands_last_on_the_device(direction: Direction) -> None:
    """Two jobs writing the same destination in a row: the second one's bytes must win."""
    for seed in range(24):
        rig = Rig("BLHNC", seed=seed, streams_per_direction=2)
        if direction is Direction.STORE:
            rig.engine.submit(TransferJob.make(0, direction, [1], [3]))
            rig.engine.submit(TransferJob.make(1, direction, [2], [3]))
            rig.device.drain()
            assert torch.equal(host_page(rig.pool, 3, 0), page_bytes(rig.layers[0][2])), seed
        else:
            rig.engine.submit(TransferJob.make(0, direction, [5], [1]))
            rig.engine.submit(TransferJob.make(1, direction, [5], [2]))
            rig.device.drain()
            assert torch.equal(page_bytes(rig.layers[0][5]), host_page(rig.pool, 2, 0)), seed
        assert [r.job_id for r in rig.engine.poll()] == [0, 1]


def test_poll_returns_nothing_while_the_compute_stream_is_busy() -> None:
    rig = Rig("LBHNC", schedule="side_first")
    rig.device.compute.ops.append(("wait", SimEvent(rig.device, False), 1))  # a never-ending kernel
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))
    rig.engine.submit(TransferJob.make(2, Direction.LOAD, [1], [1]))
    # Both jobs wait for the compute stream captured at submit; nothing can finish yet.
    while rig.device.step():
        pass
    assert rig.engine.poll() == []
    assert rig.engine.pending() == 2


def test_stores_and_loads_are_independent_lanes() -> None:
    """A load completes while a store submitted before it is held back."""
    rig = Rig("LBHNC", seed=3)
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))
    store_streams = [s for s in rig.device.streams[1:] if s.ops]
    rig.engine.submit(TransferJob.make(2, Direction.LOAD, [1], [1]))
    assert len(store_streams) == 1
    rig.device.paused = {id(store_streams[0])}
    while rig.device.step():
        pass
    got = rig.engine.poll()
    assert [(r.job_id, r.success, r.direction) for r in got] == [(2, True, Direction.LOAD)]
    rig.device.paused = set()
    assert rig.poll_all() == {1: True}


def test_poll_never_runs_the_device_and_wait_does() -> None:
    rig = Rig("LBHNC")
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0, 1], [0, 1]))
    rig.engine.submit(TransferJob.make(2, Direction.STORE, [2], [2]))
    assert rig.engine.poll() == [] and rig.device.ran == 0
    rig.engine.wait([1, 99])  # unknown ids are ignored
    results = rig.engine.poll()
    assert [r.job_id for r in results] == [1]
    assert results[0].nbytes == 2 * GEOMETRY.block_bytes
    assert results[0].seconds > 0  # device time between the job's timing events
    assert rig.engine.pending() == 1
    rig.engine.shutdown()
    assert [r.job_id for r in rig.engine.poll()] == [2]
    with pytest.raises(TransferError, match="shut down"):
        rig.engine.submit(TransferJob.make(3, Direction.STORE, [0], [0]))


def test_events_are_recycled() -> None:
    rig = Rig("BLHNC")
    for j in range(50):
        rig.engine.submit(TransferJob.make(j, Direction.LOAD if j % 2 else Direction.STORE, [j % 8], [j % 8]))
        if j % 5 == 4:
            rig.poll_all()
    rig.poll_all()
    # 3 events a job; at most 5 jobs were ever in flight at once.
    assert rig.engine.events_created <= 3 * 5


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("blocks", "slots", "match"),
    [
        ([NUM_BLOCKS], [0], "device block"),
        ([-1], [0], "device block"),
        ([0], [NUM_SLOTS], "host slot"),
        ([0, 1], [3, 3], "destination block appears twice"),
    ],
)
def test_bad_ids_raise_before_anything_is_queued(blocks: list[int], slots: list[int], match: str) -> None:
    rig = Rig("LBHNC")
    with pytest.raises(TransferError, match=match):
        rig.engine.submit(TransferJob.make(1, Direction.STORE, blocks, slots))
    assert rig.engine.pending() == 0
    assert not any(s.ops for s in rig.device.streams)
    # The id is free again: a good job with it runs.
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))
    assert rig.poll_all() == {1: True}


def test_a_job_id_in_flight_cannot_be_reused_until_polled() -> None:
    rig = Rig("LBHNC")
    rig.engine.submit(TransferJob.make(7, Direction.STORE, [0], [0]))
    with pytest.raises(TransferError, match="already in flight"):
        rig.engine.submit(TransferJob.make(7, Direction.LOAD, [1], [1]))
    assert rig.poll_all() == {7: True}
    rig.engine.submit(TransferJob.make(7, Direction.LOAD, [1], [1]))
    assert rig.poll_all() == {7: True}


def test_enqueue_failure_is_a_failed_result_and_the_engine_keeps_working() -> None:
    rig = Rig("LBHNC", schedule="side_first", policy=CopyPolicy(batch_available=True, max_descriptors=2))
    rig.backend.fail_enqueue = 1
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0, 1], [0, 1]))  # no exception
    rig.engine.submit(TransferJob.make(2, Direction.STORE, [2], [2]))
    assert rig.engine.pending() == 2
    results = {r.job_id: r for r in rig.drain_poll()}
    assert not results[1].success and results[1].nbytes == 0
    assert "INVALID_VALUE" in (results[1].error or "")
    assert results[2].success
    for layer in range(4):
        assert torch.equal(host_page(rig.pool, 2, layer), page_bytes(rig.layers[layer][2]))


def test_failed_job_is_reported_only_after_its_partial_copies_finished() -> None:
    rig = Rig("LBHNC", schedule="side_first", policy=CopyPolicy(batch_available=True, max_descriptors=2))
    rig.backend.fail_enqueue = 1
    rig.device.compute.ops.append(("wait", SimEvent(rig.device, False), 1))  # compute never finishes
    rig.engine.submit(TransferJob.make(1, Direction.LOAD, [0, 1], [0, 1]))
    while rig.device.step():
        pass
    assert rig.engine.poll() == [], "failure reported while its copies could still run"


def test_asynchronous_device_error_fails_the_job_without_raising() -> None:
    rig = Rig("LBHNC")
    rig.backend.fault_next = True
    rig.engine.submit(TransferJob.make(1, Direction.LOAD, [0], [0]))
    results = rig.drain_poll()
    assert [(r.job_id, r.success) for r in results] == [(1, False)]
    assert "illegal address" in (results[0].error or "")
    assert rig.engine.pending() == 0


def test_empty_job_completes() -> None:
    rig = Rig("LBHNC")
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [], []))
    assert rig.backend.calls == [(Direction.STORE, [])]
    results = rig.drain_poll()
    assert [(r.job_id, r.success, r.nbytes) for r in results] == [(1, True, 0)]


def test_engine_rejects_a_bad_pool() -> None:
    dev = SimDevice()
    _, layers = make_layers("LBHNC")
    regions = regions_from_layers(layers, GEOMETRY)
    with pytest.raises(ValueError, match="uint8"):
        CudaTransferEngine(regions, torch.zeros(4, 4096, dtype=torch.float32), backend=SimBackend(dev))
    with pytest.raises(ValueError, match="regions"):
        CudaTransferEngine([], torch.zeros(4, 4096, dtype=torch.uint8), backend=SimBackend(dev))


def test_dropping_the_engine_frees_it_without_the_garbage_collector() -> None:
    import gc
    import weakref

    rig = Rig("LBHNC")
    rig.engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))
    rig.poll_all()
    ref = weakref.ref(rig.engine)
    gc.disable()
    try:
        del rig.engine
        assert ref() is None, "a reference cycle keeps the engine (and its pool view) alive"
    finally:
        gc.enable()
