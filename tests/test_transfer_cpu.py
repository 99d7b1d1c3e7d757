# SPDX-License-Identifier: Apache-2.0
"""CPU transfer engine and copy planning: exact copies, nothing else touched."""

from __future__ import annotations

import ctypes
import random
import threading

import numpy as np
import pytest
import torch

from kv_layouts import LAYOUTS, KVCache, make_kv_cache, small_geometry
from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.pool import HostPool, PoolSpec
from kv_offload.transfer import (
    CopyBatch,
    Direction,
    TransferError,
    TransferJob,
    build_copy_batch,
    coalesce,
    regions_from_layers,
)
from kv_offload.transfer.cpu_engine import CpuTransferEngine
from kv_offload.transfer.cpu_engine import _run_copy_batch as run_copy_batch  # internal: raw addresses

NUM_BLOCKS = 24
NUM_SLOTS = 10
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def host_page(pool: torch.Tensor, geometry: KVGeometry, slot: int, layer: int) -> torch.Tensor:
    off = geometry.page_offset(layer)
    return pool[slot, off : off + geometry.page_bytes]


def random_map(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    blocks = rng.sample(range(NUM_BLOCKS), n)
    slots = rng.sample(range(NUM_SLOTS), n)
    return blocks, slots


@pytest.fixture
def pool_tensor() -> torch.Tensor:
    geometry = small_geometry()
    # Random bytes, so "untouched" is checked against something other than zeros.
    return torch.randint(0, 256, (NUM_SLOTS, geometry.slot_bytes), dtype=torch.uint8)


def _engine(cache: KVCache, geometry: KVGeometry, pool: torch.Tensor, threads: int = 2) -> CpuTransferEngine:
    return CpuTransferEngine(regions_from_layers(cache.layers, geometry), pool, num_threads=threads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_store_then_load_maps_exactly(layout: str, dtype: torch.dtype, seed: int) -> None:
    geometry = small_geometry(dtype)
    cache = make_kv_cache(geometry, NUM_BLOCKS, layout, seed=seed)
    pool = torch.randint(0, 256, (NUM_SLOTS, geometry.slot_bytes), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    rng = random.Random(seed)
    engine = _engine(cache, geometry, pool, threads=1 + seed % 3)
    try:
        blocks, slots = random_map(rng, rng.randint(1, 6))
        kv_before = cache.storage.clone()
        pool_before = pool.clone()
        engine.submit(TransferJob.make(1, Direction.STORE, blocks, slots))
        engine.wait([1])
        (result,) = engine.poll()
        assert result.success and result.job_id == 1
        assert result.nbytes == len(blocks) * geometry.block_bytes
        for b, s in zip(blocks, slots):
            for layer in range(geometry.num_layers):
                assert torch.equal(host_page(pool, geometry, s, layer), cache.block_bytes(layer, b))
        assert torch.equal(cache.storage, kv_before), "a store changed its source"
        untouched = [s for s in range(NUM_SLOTS) if s not in slots]
        assert torch.equal(pool[untouched], pool_before[untouched]), "a store wrote other slots"
        # Slot padding past the payload is never written.
        tail = slice(geometry.block_bytes, geometry.slot_bytes)
        assert torch.equal(pool[:, tail], pool_before[:, tail])

        # Bring the stored blocks back into other device blocks.
        free_blocks = [b for b in range(NUM_BLOCKS) if b not in blocks]
        targets = rng.sample(free_blocks, len(slots))
        kv_before = cache.storage.clone()
        pool_before = pool.clone()
        engine.submit(TransferJob.make(2, Direction.LOAD, targets, slots))
        engine.wait([2])
        (result,) = engine.poll()
        assert result.success
        for t, b in zip(targets, blocks):
            for layer in range(geometry.num_layers):
                assert torch.equal(cache.layers[layer][t], cache.layers[layer][b])
        assert torch.equal(pool, pool_before), "a load changed the pool"
        expected = kv_before.clone()
        expected_layers = make_views_like(cache, expected)
        for t, b in zip(targets, blocks):
            for layer in range(geometry.num_layers):
                expected_layers[layer][t] = expected_layers[layer][b]
        assert torch.equal(cache.storage, expected), "a load wrote outside its target blocks"
    finally:
        engine.shutdown()


def make_views_like(cache: KVCache, storage: torch.Tensor) -> list[torch.Tensor]:
    """The same layer views as ``cache.layers``, over another storage of the same shape."""
    base = cache.storage
    return [
        storage.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())
        for t in cache.layers
    ]


def test_jobs_run_in_submission_order() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    engine = _engine(cache, geometry, pool)
    try:
        # Store block 3 into slot 0, then load slot 0 into block 7, then store block 9 into
        # slot 0: the load must see block 3's bytes, and slot 0 must end with block 9's.
        engine.submit(TransferJob.make(10, Direction.STORE, [3], [0]))
        engine.submit(TransferJob.make(11, Direction.LOAD, [7], [0]))
        engine.submit(TransferJob.make(12, Direction.STORE, [9], [0]))
        engine.wait([10, 11, 12])
        results = engine.poll()
        assert [r.job_id for r in results] == [10, 11, 12]
        assert all(r.success for r in results)
        for layer in range(geometry.num_layers):
            assert torch.equal(cache.layers[layer][7], cache.layers[layer][3])
            assert torch.equal(host_page(pool, geometry, 0, layer), cache.block_bytes(layer, 9))
        assert engine.pending() == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("blocks", "slots", "message"),
    [
        ([NUM_BLOCKS], [0], "device block"),
        ([-1], [0], "device block"),
        ([0], [NUM_SLOTS], "host slot"),
        ([0, 1], [2, 2], "destination block appears twice"),
    ],
)
def test_bad_jobs_are_rejected_before_queueing(blocks: list[int], slots: list[int], message: str) -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    engine = _engine(cache, geometry, pool)
    try:
        before = cache.storage.clone()
        with pytest.raises(TransferError, match=message):
            engine.submit(TransferJob.make(1, Direction.STORE, blocks, slots))
        assert engine.pending() == 0 and engine.poll() == []
        assert torch.equal(cache.storage, before) and not pool.any()
    finally:
        engine.shutdown()


def test_mismatched_job_lengths() -> None:
    with pytest.raises(TransferError, match="2 device blocks but 1 host slots"):
        TransferJob.make(5, Direction.LOAD, [1, 2], [3])


def test_engine_after_shutdown_refuses_jobs() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    engine = _engine(cache, geometry, torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8))
    engine.shutdown()
    with pytest.raises(TransferError, match="shut down"):
        engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))


def test_submit_racing_shutdown_is_refused_not_lost() -> None:
    """A job accepted while shutdown() stops the thread would never run: wait() would hang."""
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    engine = _engine(cache, geometry, torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8))
    plan = engine.plan

    def plan_then_shut_down(job: TransferJob) -> CopyBatch:
        batch = plan(job)
        engine.shutdown()  # lands between submit's first check and the queueing
        return batch

    engine.plan = plan_then_shut_down  # type: ignore[method-assign]
    with pytest.raises(TransferError, match="shut down"):
        engine.submit(TransferJob.make(1, Direction.STORE, [0], [0]))
    assert engine.pending() == 0
    engine.wait([1])  # returns: nothing of job 1 is in flight


def test_shutdown_runs_queued_jobs_and_keeps_their_results() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    engine = _engine(cache, geometry, pool)
    for i in range(NUM_SLOTS):
        engine.submit(TransferJob.make(100 + i, Direction.STORE, [i], [i]))
    engine.shutdown()
    results = engine.poll()
    assert [r.job_id for r in results] == [100 + i for i in range(NUM_SLOTS)]
    assert all(r.success for r in results) and engine.pending() == 0
    for i in range(NUM_SLOTS):
        assert torch.equal(host_page(pool, geometry, i, 0), cache.block_bytes(0, i))


def test_job_id_is_reusable_only_after_poll_reported_it() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    engine = _engine(cache, geometry, pool)
    try:
        engine.submit(TransferJob.make(7, Direction.STORE, [1], [0]))
        engine.wait([7, 12345])  # unknown ids are ignored
        with pytest.raises(TransferError, match="job 7 is already in flight"):
            engine.submit(TransferJob.make(7, Direction.STORE, [2], [1]))  # finished, not polled
        assert [r.job_id for r in engine.poll()] == [7]
        engine.submit(TransferJob.make(7, Direction.STORE, [2], [1]))
        engine.wait([7])
        (result,) = engine.poll()
        assert result.job_id == 7 and result.success and engine.pending() == 0
        assert torch.equal(host_page(pool, geometry, 1, 0), cache.block_bytes(0, 2))
    finally:
        engine.shutdown()


def test_dropped_engine_is_freed_at_once_and_its_thread_finishes_queued_jobs() -> None:
    import gc
    import weakref

    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "per_layer")
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    engine = _engine(cache, geometry, pool)
    thread = engine._thread
    for i in range(NUM_SLOTS):
        engine.submit(TransferJob.make(i, Direction.STORE, [i], [i]))
    ref = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert ref() is None, "the copy thread keeps the engine (and its pool view) alive"
    finally:
        gc.enable()
    thread.join(timeout=60)
    assert not thread.is_alive(), "a dropped engine's thread never stops"
    for i in range(NUM_SLOTS):
        assert torch.equal(host_page(pool, geometry, i, 0), cache.block_bytes(0, i))


def test_geometry_mismatch_names_the_layer() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(small_geometry(torch.bfloat16), NUM_BLOCKS, "per_layer")
    with pytest.raises(ValueError, match="layer 0: a block holds"):
        regions_from_layers(cache.layers, geometry)


def test_block_outermost_layout_coalesces_to_one_descriptor_per_block() -> None:
    geometry = small_geometry()
    cache = make_kv_cache(geometry, NUM_BLOCKS, "block_outermost")
    regions = regions_from_layers(cache.layers, geometry)
    pool = torch.zeros(NUM_SLOTS, geometry.slot_bytes, dtype=torch.uint8)
    job = TransferJob.make(1, Direction.STORE, [4, 9, 2], [1, 5, 6])
    batch = build_copy_batch(job, regions, pool.data_ptr(), pool.stride(0), NUM_SLOTS)
    assert batch.num_descriptors == 3
    assert batch.sizes.tolist() == [geometry.block_bytes] * 3
    # Consecutive blocks into consecutive slots merge further, when slots are unpadded.
    job = TransferJob.make(2, Direction.LOAD, [4, 5, 6], [1, 2, 3])
    batch = build_copy_batch(job, regions, pool.data_ptr(), geometry.block_bytes, NUM_SLOTS)
    assert batch.num_descriptors == 1 and batch.total_bytes == 3 * geometry.block_bytes
    # Per-layer pages cannot merge across layers.
    per_layer = regions_from_layers(make_kv_cache(geometry, NUM_BLOCKS, "per_layer_padded").layers, geometry)
    batch = build_copy_batch(job, per_layer, pool.data_ptr(), pool.stride(0), NUM_SLOTS)
    assert batch.num_descriptors == 3 * geometry.num_layers


def _reference_copy(batch: CopyBatch) -> None:
    for s, d, n in zip(batch.src.tolist(), batch.dst.tolist(), batch.sizes.tolist()):
        ctypes.memmove(d, s, n)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_copy_op_matches_reference(seed: int, threads: int) -> None:
    rng = np.random.default_rng(seed)
    src_buf = torch.from_numpy(rng.integers(0, 256, 3 << 20, dtype=np.uint8))
    n = int(rng.integers(1, 40))
    sizes = rng.integers(0, 200_000, n)
    sizes[rng.integers(0, n)] = 0  # zero-size descriptors are legal
    src_off = rng.integers(0, src_buf.numel() - 200_000, n)
    # Non-overlapping destinations, laid out in another order than the sources.
    order = rng.permutation(n)
    starts = np.concatenate(([0], np.cumsum(sizes[order])[:-1]))
    dst_off = np.empty(n, dtype=np.int64)
    dst_off[order] = starts
    expected = torch.zeros(int(sizes.sum()) + 64, dtype=torch.uint8)
    actual = torch.zeros_like(expected)
    batch_for = lambda out: CopyBatch(  # noqa: E731
        (src_buf.data_ptr() + src_off).astype(np.int64),
        (out.data_ptr() + dst_off).astype(np.int64),
        sizes.astype(np.int64),
    )
    _reference_copy(batch_for(expected))
    run_copy_batch(batch_for(actual), threads)
    assert torch.equal(actual, expected)


_Q = 1 << 18  # the copy op uses one thread per 256 KiB at most


@pytest.mark.parametrize(
    "sizes",
    [
        [_Q, _Q, _Q, _Q],  # thread ranges end exactly on segment boundaries
        [0, _Q, _Q, 0],  # zero-size first and last segments
        [0, 0, 2 * _Q, 0, 0],
        [_Q, 0, 0, _Q, 0, _Q, 0, 0, _Q],  # zero-size segments at the split points
        [4 * _Q],  # more threads than segments
        [1, 4 * _Q - 1],
        [4 * _Q - 1, 1],
        [2 * _Q + 1, 2 * _Q - 1],
        [3, 2 * _Q, 5, 0, _Q, 7],
    ],
)
@pytest.mark.parametrize("threads", [2, 3, 4, 16])
def test_copy_op_split_at_segment_boundaries(sizes: list[int], threads: int) -> None:
    total = sum(sizes)
    src = torch.from_numpy(np.random.default_rng(total).integers(0, 256, total, dtype=np.uint8))
    dst = torch.zeros(total + 4096, dtype=torch.uint8)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    sizes_ = np.array(sizes, dtype=np.int64)
    run_copy_batch(CopyBatch(src.data_ptr() + offsets, dst.data_ptr() + offsets, sizes_), threads)
    assert torch.equal(dst[:total], src), "a byte range was skipped or copied from the wrong place"
    assert not dst[total:].any(), "a thread wrote past the last segment"


def test_coalesce_copies_the_same_bytes() -> None:
    rng = np.random.default_rng(7)
    src = torch.from_numpy(rng.integers(0, 256, 1 << 16, dtype=np.uint8))
    # Runs of adjacent descriptors mixed with gaps.
    sizes = rng.integers(1, 512, 64).astype(np.int64)
    src_off = np.cumsum(np.concatenate(([0], sizes[:-1] + (rng.random(63) < 0.3) * 17)))
    dst_off = np.cumsum(np.concatenate(([0], sizes[:-1] + (rng.random(63) < 0.3) * 5)))
    out_a = torch.zeros(1 << 16, dtype=torch.uint8)
    out_b = torch.zeros_like(out_a)
    plain = CopyBatch(src.data_ptr() + src_off, out_a.data_ptr() + dst_off, sizes)
    merged = coalesce(CopyBatch(src.data_ptr() + src_off, out_b.data_ptr() + dst_off, sizes))
    assert merged.num_descriptors < plain.num_descriptors
    assert merged.total_bytes == plain.total_bytes
    _reference_copy(plain)
    run_copy_batch(merged, 2)
    assert torch.equal(out_a, out_b)


def test_engine_over_a_host_pool() -> None:
    geometry = KVGeometry(num_layers=2, num_kv_heads=1, head_size=64, block_size=32,
                          dtype=torch.bfloat16, page_format=PageFormat.HND)  # fmt: skip
    cache = make_kv_cache(geometry, 8, "per_layer")
    with HostPool(PoolSpec(capacity_bytes=4 * geometry.slot_bytes, slot_bytes=geometry.slot_bytes)) as pool:
        engine = _engine(cache, geometry, pool.tensor)
        try:
            engine.submit(TransferJob.make(1, Direction.STORE, [5, 6], [3, 0]))
            engine.wait([1])
            assert engine.poll()[0].success
            for layer in range(geometry.num_layers):
                assert torch.equal(host_page(pool.tensor, geometry, 3, layer), cache.block_bytes(layer, 5))
                assert torch.equal(host_page(pool.tensor, geometry, 0, layer), cache.block_bytes(layer, 6))
        finally:
            engine.shutdown()


def test_copies_run_without_the_gil() -> None:
    """The engine thread must not stall the Python thread that drives vLLM's step."""
    n = 256 << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    batch = CopyBatch(np.array([src.data_ptr()]), np.array([dst.data_ptr()]), np.array([n]))
    started = threading.Event()
    done = threading.Event()

    def copy() -> None:
        started.set()
        for _ in range(2):
            run_copy_batch(batch, 1)
        done.set()

    worker = threading.Thread(target=copy)
    worker.start()
    started.wait()
    spins = 0
    while not done.is_set():
        spins += 1
    worker.join()
    # Holding the GIL for the whole copy would leave this thread a handful of turns at most.
    assert spins > 10_000
    assert bool(dst[-1] == 1)
