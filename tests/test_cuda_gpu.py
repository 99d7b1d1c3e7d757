# SPDX-License-Identifier: Apache-2.0
"""The CUDA engine and the pinned pool on a real GPU (``gpu`` marker: skipped without one).

KV caches are real CUDA tensors in vLLM's layouts (per-layer LBHNC pages and
block-outermost BLHNC blocks); the host pool is a real ``HostPool``, page-locked by
``cuMemHostRegister``. Ordering tests put a long ``torch.cuda._sleep`` on the compute stream
so a missing barrier shows as stale bytes rather than as luck.
"""

from __future__ import annotations

import gc
import os
import random
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kv_offload.geometry import KVGeometry, PageFormat
from kv_offload.pool import HostPool, PinMode, PoolSpec
from kv_offload.transfer import Direction, TransferJob, TransferResult, regions_from_layers
from kv_offload.transfer.cuda_batch import CopyPolicy

pytestmark = pytest.mark.gpu

# 8 layers, 16 KiB pages, 128 KiB blocks: many random maps stay quick.
GEOMETRY = KVGeometry(
    num_layers=8, num_kv_heads=4, head_size=64, block_size=16, dtype=torch.bfloat16, page_format=PageFormat.HND
)
NUM_BLOCKS = 96
NUM_SLOTS = 64
LAYOUTS = ("LBHNC", "BLHNC")
#: GPU cycles for the compute-stream delay (tens of ms on current GPUs).
SLEEP_CYCLES = 100_000_000


def make_storage(layout: str, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = GEOMETRY
    tail = (g.num_kv_heads, g.block_size, g.head_size + g.v_head_size)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "LBHNC":
        storage = torch.randn(g.num_layers, NUM_BLOCKS, *tail, device="cuda", generator=gen).to(g.dtype)
        return storage, [storage[i] for i in range(g.num_layers)]
    storage = torch.randn(NUM_BLOCKS, g.num_layers, *tail, device="cuda", generator=gen).to(g.dtype)
    return storage, [storage[:, i] for i in range(g.num_layers)]


def block_view(storage: torch.Tensor, layout: str) -> torch.Tensor:
    """``uint8[B, L, page]`` view of the KV storage (writes go through)."""
    g = GEOMETRY
    u = storage.view(torch.uint8)
    if layout == "LBHNC":
        return u.reshape(g.num_layers, NUM_BLOCKS, g.page_bytes).permute(1, 0, 2)
    return u.reshape(NUM_BLOCKS, g.num_layers, g.page_bytes)


def host_blocks(pool: HostPool, slots: list[int]) -> torch.Tensor:
    g = GEOMETRY
    return pool.tensor[slots, : g.block_bytes].reshape(len(slots), g.num_layers, g.page_bytes)


@pytest.fixture
def pool() -> Iterator[HostPool]:
    p = HostPool(PoolSpec(capacity_bytes=NUM_SLOTS * GEOMETRY.slot_bytes, slot_bytes=GEOMETRY.slot_bytes))
    p.tensor.copy_(torch.randint(0, 256, p.tensor.shape, dtype=torch.uint8))
    yield p
    p.close()


def make_engine(layers: list[torch.Tensor], pool: HostPool, policy: str = "auto", **kw: object):  # type: ignore[no-untyped-def]
    from kv_offload.cuda.copy import probe_batch_memcpy
    from kv_offload.transfer.cuda_engine import CudaTransferEngine

    pol: CopyPolicy | None
    if policy == "auto":
        pol = None
    elif policy == "loop":
        pol = CopyPolicy(batch_available=False)
    else:  # "split": batched calls of at most 7 descriptors where the driver has them
        pol = CopyPolicy(batch_available=probe_batch_memcpy(torch.cuda.current_device()) is None, max_descriptors=7)
    return CudaTransferEngine(regions_from_layers(layers, GEOMETRY), pool.tensor, policy=pol, **kw)  # type: ignore[arg-type]


def run(engine, job: TransferJob) -> TransferResult:  # type: ignore[no-untyped-def]
    engine.submit(job)
    engine.wait([job.job_id])
    results = engine.poll()
    assert [r.job_id for r in results] == [job.job_id]
    assert results[0].success, results[0].error
    return results[0]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Exact copies


def test_host_pool_is_page_locked_with_a_gpu(pool: HostPool) -> None:
    from kv_offload.cuda.runtime import is_host_registered

    assert pool.pinned
    assert pool.tensor.is_pinned()
    assert is_host_registered(pool.base_ptr + pool.nbytes - 1)


@pytest.mark.parametrize("policy", ["auto", "loop", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stores_and_loads_on_random_block_maps(layout: str, policy: str, pool: HostPool) -> None:
    storage, layers = make_storage(layout, seed=len(policy))
    engine = make_engine(layers, pool, policy)
    rng = random.Random(f"{layout}{policy}")
    for it in range(25):
        n = rng.randint(1, 40)
        blocks = rng.sample(range(NUM_BLOCKS), n)
        slots = rng.sample(range(NUM_SLOTS), n)
        kv_before = storage.clone()
        pool_before = pool.tensor.clone()
        result = run(engine, TransferJob.make(2 * it, Direction.STORE, blocks, slots))
        assert result.nbytes == n * GEOMETRY.block_bytes and result.seconds > 0
        assert torch.equal(storage, kv_before), "a store changed the KV cache"
        assert torch.equal(host_blocks(pool, slots), block_view(storage, layout)[blocks].cpu())
        untouched = sorted(set(range(NUM_SLOTS)) - set(slots))
        assert torch.equal(pool.tensor[untouched], pool_before[untouched]), "a store touched other slots"

        targets = rng.sample(range(NUM_BLOCKS), n)
        pool_before = pool.tensor.clone()
        expected = storage.clone()
        block_view(expected, layout)[targets] = host_blocks(pool, slots).cuda()
        run(engine, TransferJob.make(2 * it + 1, Direction.LOAD, targets, slots))
        assert torch.equal(pool.tensor, pool_before), "a load changed the pool"
        assert torch.equal(storage, expected), "a load wrote wrong bytes or touched other blocks"
    engine.shutdown()


def test_both_directions_in_flight_at_once(pool: HostPool) -> None:
    storage, layers = make_storage("LBHNC", seed=5)
    engine = make_engine(layers, pool)
    store_blocks, store_slots = list(range(0, 32)), list(range(0, 32))
    load_blocks, load_slots = list(range(40, 72)), list(range(32, 64))
    expected = storage.clone()
    block_view(expected, "LBHNC")[load_blocks] = host_blocks(pool, load_slots).cuda()
    engine.submit(TransferJob.make(1, Direction.STORE, store_blocks, store_slots))
    engine.submit(TransferJob.make(2, Direction.LOAD, load_blocks, load_slots))
    engine.wait([1, 2])
    assert {(r.job_id, r.success) for r in engine.poll()} == {(1, True), (2, True)}
    assert torch.equal(storage, expected)
    assert torch.equal(host_blocks(pool, store_slots), block_view(storage, "LBHNC")[store_blocks].cpu())
    assert engine.pending() == 0


# --------------------------------------------------------------------------------------------
# Ordering against the compute stream


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_right_after_a_kernel_copies_the_kernels_values(layout: str, pool: HostPool) -> None:
    storage, layers = make_storage(layout, seed=1)
    engine = make_engine(layers, pool)
    blocks = block_view(storage, layout)
    torch.cuda.synchronize()

    # Control: a copy on a side stream that does not wait reads the block before the
    # delayed kernel wrote it, so this rig does detect a missing barrier.
    side = torch.cuda.Stream()
    staging = torch.empty(blocks[3].shape, dtype=torch.uint8).pin_memory()
    torch.cuda._sleep(SLEEP_CYCLES)
    blocks[3].fill_(0xA5)
    with torch.cuda.stream(side):
        staging.copy_(blocks[3], non_blocking=True)
    side.synchronize()
    assert not bool((staging == 0xA5).all()), "control failed: the race is not observable here"
    torch.cuda.synchronize()

    for job_id, value in enumerate((0x11, 0x22, 0x33)):
        torch.cuda._sleep(SLEEP_CYCLES)
        blocks[7].fill_(value)  # the forward pass writes the block ...
        engine.submit(TransferJob.make(job_id, Direction.STORE, [7], [job_id]))  # ... then it is stored
        engine.wait([job_id])
        assert [r.success for r in engine.poll()] == [True]
        assert bool((host_blocks(pool, [job_id]) == value).all()), "the store read the block before the kernel"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("explicit_stream", [False, True])
def test_compute_stream_waiting_on_a_load_reads_the_loaded_values(
    layout: str, explicit_stream: bool, pool: HostPool
) -> None:
    storage, layers = make_storage(layout, seed=2)
    engine = make_engine(layers, pool)
    blocks = block_view(storage, layout)
    pool.tensor[:, : GEOMETRY.block_bytes].fill_(0x5A)
    blocks.fill_(0)
    compute = torch.cuda.Stream() if explicit_stream else torch.cuda.current_stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(compute):
        torch.cuda._sleep(SLEEP_CYCLES)  # the load waits for this, and so does the read below
        # A large load first (FIFO puts the small one behind it), then the block we read.
        engine.submit(TransferJob.make(1, Direction.LOAD, list(range(0, 60)), list(range(0, 60))))
        engine.submit(TransferJob.make(2, Direction.LOAD, [80], [61]))
        engine.wait_on_stream([2], compute if explicit_stream else None)
        seen = blocks[80].clone()
    compute.synchronize()
    assert bool((seen == 0x5A).all()), "the compute stream read the block before its load finished"
    engine.wait([1, 2])
    assert [r.job_id for r in engine.poll()] == [1, 2]


def test_reading_after_poll_reported_the_load_sees_it(pool: HostPool) -> None:
    storage, layers = make_storage("BLHNC", seed=3)
    engine = make_engine(layers, pool)
    pool.tensor[9].fill_(0x42)
    engine.submit(TransferJob.make(1, Direction.LOAD, [4], [9]))
    done: list[TransferResult] = []
    while not done:  # the connector's rule: run the request only once poll() reported its load
        done = engine.poll()
    assert bool((block_view(storage, "BLHNC")[4] == 0x42).all())


# --------------------------------------------------------------------------------------------
# Copies through the driver API directly


@pytest.mark.parametrize("method", ["batch", "loop"])
def test_driver_copies_move_scattered_ranges_both_ways(method: str) -> None:
    from kv_offload.cuda.copy import memcpy_batch_async, memcpy_loop_async, probe_batch_memcpy

    if method == "batch" and probe_batch_memcpy(torch.cuda.current_device()) is not None:
        pytest.skip("cuMemcpyBatchAsync is not available with this driver/bindings")
    rng = np.random.default_rng(0)
    dev = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    host = torch.zeros(1 << 20, dtype=torch.uint8).pin_memory()
    chunks = rng.permutation(256)[:100]  # 4 KiB ranges, scattered, never overlapping
    offs = (chunks * 4096).astype(np.int64)
    sizes = rng.integers(1, 4097, 100).astype(np.int64)
    dst_offs = np.roll(offs, 7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    copy = memcpy_batch_async if method == "batch" else memcpy_loop_async
    copy(dev.data_ptr() + offs, host.data_ptr() + dst_offs, sizes, stream.cuda_stream)
    stream.synchronize()
    dev_cpu = dev.cpu()
    for o, d, n in zip(offs, dst_offs, sizes):
        assert torch.equal(host[d : d + n], dev_cpu[o : o + n])
    back = torch.zeros_like(dev)
    stream.wait_stream(torch.cuda.current_stream())
    copy(host.data_ptr() + dst_offs, back.data_ptr() + offs, sizes, stream.cuda_stream)
    stream.synchronize()
    back_cpu = back.cpu()
    for o, n in zip(offs, sizes):
        assert torch.equal(back_cpu[o : o + n], dev_cpu[o : o + n])


def test_batched_dma_is_used_where_the_driver_has_it() -> None:
    import cuda.bindings

    from kv_offload.cuda.copy import BATCH_MIN_DRIVER, probe_batch_memcpy
    from kv_offload.cuda.runtime import driver_version

    version = driver_version()
    bindings_major = int(str(cuda.bindings.__version__).split(".")[0])
    why_not = probe_batch_memcpy(torch.cuda.current_device())
    if version >= BATCH_MIN_DRIVER and bindings_major <= version // 1000:
        assert why_not is None
    else:
        assert why_not is not None


# --------------------------------------------------------------------------------------------
# The pinned pool


def test_registration_in_chunks_and_back() -> None:
    from kv_offload.cuda.runtime import host_register, host_unregister, is_host_registered

    mib = 1 << 20
    with HostPool(PoolSpec(capacity_bytes=9 * mib, slot_bytes=mib, pin=PinMode.NEVER)) as pool:
        base = pool.base_ptr
        assert not is_host_registered(base)
        chunks = host_register(base, 9 * mib, chunk=2 * mib)
        assert chunks == [(base + i * 2 * mib, min(2 * mib, 9 * mib - i * 2 * mib)) for i in range(5)]
        for off in (0, 2 * mib - 1, 2 * mib, 5 * mib, 9 * mib - 1):
            assert is_host_registered(base + off)
        assert pool.tensor.is_pinned()
        host_unregister(chunks)
        assert not is_host_registered(base)
        assert not is_host_registered(base + 8 * mib)


def test_failed_registration_rolls_back_and_leaves_cuda_usable() -> None:
    from kv_offload.cuda.runtime import CudaError, host_register, host_unregister, is_host_registered

    mib = 1 << 20
    with HostPool(PoolSpec(capacity_bytes=8 * mib, slot_bytes=mib, pin=PinMode.NEVER)) as pool:
        base = pool.base_ptr
        taken = host_register(base + 4 * mib, 2 * mib)  # the third chunk is registered already
        with pytest.raises(CudaError, match="cuMemHostRegister"):
            host_register(base, 8 * mib, chunk=2 * mib)
        assert not is_host_registered(base), "chunks before the failing one were not rolled back"
        assert not is_host_registered(base + 2 * mib)
        assert is_host_registered(base + 4 * mib), "the rollback unregistered someone else's range"
        host_unregister(taken)
    # No error left behind for the next CUDA user.
    x = torch.ones(1024, device="cuda")
    assert float((x * 2).sum().item()) == 2048.0
    torch.cuda.synchronize()


def test_host_pool_in_chunks_and_the_engine_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_offload.cuda import runtime

    real = runtime.host_register
    monkeypatch.setattr(runtime, "host_register", lambda a, n, chunk=0: real(a, n, chunk=3 * GEOMETRY.slot_bytes))
    with HostPool(PoolSpec(capacity_bytes=NUM_SLOTS * GEOMETRY.slot_bytes, slot_bytes=GEOMETRY.slot_bytes)) as pool:
        assert pool.pinned and len(pool._registered) == -(-NUM_SLOTS // 3)
        storage, layers = make_storage("BLHNC", seed=4)
        engine = make_engine(layers, pool)
        run(engine, TransferJob.make(1, Direction.STORE, [1, 50, 90], [0, 31, 63]))
        assert torch.equal(host_blocks(pool, [0, 31, 63]), block_view(storage, "BLHNC")[[1, 50, 90]].cpu())
        engine.shutdown()
        del engine


def test_host_pool_stays_pageable_when_registration_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from kv_offload.cuda import runtime
    from kv_offload.transfer.cuda_engine import CudaTransferEngine

    real = runtime.host_register
    taken: list[tuple[int, int]] = []

    def register_twice(address: int, length: int, chunk: int = runtime.MAX_REGISTER_CHUNK) -> list[tuple[int, int]]:
        taken.extend(real(address, length))  # someone registered the range first
        return real(address, length, chunk)

    monkeypatch.setattr(runtime, "host_register", register_twice)
    spec = PoolSpec(capacity_bytes=NUM_SLOTS * GEOMETRY.slot_bytes, slot_bytes=GEOMETRY.slot_bytes)
    with pytest.warns(RuntimeWarning, match="stays pageable"):
        pool = HostPool(spec)
    try:
        assert not pool.pinned and taken
        runtime.host_unregister(taken)
        assert not pool.tensor.is_pinned()
        storage, layers = make_storage("LBHNC", seed=6)
        with pytest.warns(RuntimeWarning, match="not page-locked"):
            engine = CudaTransferEngine(regions_from_layers(layers, GEOMETRY), pool.tensor)
        pool.tensor[5].fill_(0x7E)
        run(engine, TransferJob.make(1, Direction.LOAD, [3], [5]))
        assert bool((block_view(storage, "LBHNC")[3] == 0x7E).all())
        run(engine, TransferJob.make(2, Direction.STORE, [3], [6]))
        assert bool((pool.tensor[6, : GEOMETRY.block_bytes] == 0x7E).all())
        engine.shutdown()
        del engine
    finally:
        pool.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_create_and_destroy_does_not_leak() -> None:
    from kv_offload.transfer.cuda_engine import CudaTransferEngine

    storage, layers = make_storage("LBHNC", seed=7)
    regions = regions_from_layers(layers, GEOMETRY)
    pool_bytes = 64 << 20
    spec = PoolSpec(capacity_bytes=pool_bytes, slot_bytes=GEOMETRY.slot_bytes, prefault=True)

    def cycle(i: int) -> None:
        pool = HostPool(spec)
        assert pool.pinned
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a pageable pool here would be a regression
            engine = CudaTransferEngine(regions, pool.tensor)
        run(engine, TransferJob.make(i, Direction.STORE, list(range(32)), list(range(32))))
        run(engine, TransferJob.make(i + 1, Direction.LOAD, list(range(32, 64)), list(range(32))))
        engine.shutdown()
        del engine
        pool.close()

    for i in range(3):  # warm up: CUDA context, streams, allocator, probe
        cycle(10 * i)
    gc.collect()  # measure what survives a collection: that is what leaks
    torch.cuda.synchronize()
    rss0, free0 = _rss_bytes(), torch.cuda.mem_get_info()[0]
    for i in range(3, 23):
        cycle(10 * i)
    gc.collect()
    torch.cuda.synchronize()
    rss1, free1 = _rss_bytes(), torch.cuda.mem_get_info()[0]
    # 20 cycles of a 64 MiB pool: a leaked pool would add >= 1.2 GiB; allow noise.
    assert rss1 - rss0 < pool_bytes, f"host RSS grew by {(rss1 - rss0) >> 20} MiB"
    assert free0 - free1 < (32 << 20), f"device memory shrank by {(free0 - free1) >> 20} MiB"
